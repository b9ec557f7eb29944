"""The training loop: one process (CPU or one GPU), exact resume, metrics, checkpoints."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nmoe.data import Tokenizer, open_loader
from nmoe.metrics import MetricsWriter, Registry
from nmoe.model import Transformer, model_summary
from nmoe.train import checkpoint as ckpt
from nmoe.train.config import Config, fingerprint_items
from nmoe.train.data_setup import ensure_data
from nmoe.train.mfu import mfu, peak_tflops
from nmoe.train.optim import build_optimizer, expert_names
from nmoe.train.schedule import lr_at


class SetupError(RuntimeError):
    """The run cannot start as configured (device, data/model mismatch); the message says what to change."""


class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/Inf; the message names the step, the layer and the last good checkpoint."""


@dataclass
class RunResult:
    run_id: str
    status: str  # completed | interrupted | failed
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    val_loss: float | None = None
    checkpoint: Path | None = None
    stop_signal: int | None = None  # the signal that interrupted the run, if any


def pick_device(cfg: Config) -> torch.device:
    want = cfg.runtime.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SetupError(
                "runtime.device = 'cuda' but no CUDA GPU is visible. Set runtime.device = 'cpu' (or 'auto') or run on a GPU machine."
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    mode = cfg.runtime.dtype
    if mode == "fp32" or (mode == "auto" and device.type == "cpu"):
        return None
    return torch.bfloat16


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (checkpoint, then exit)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Builds everything a run needs from a Config and runs it: `Trainer(cfg).run()`."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self.device = pick_device(cfg)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.world_size = 1
        self.rank = 0
        self.ckpt_root = Path(cfg.checkpoint.dir) / cfg.name
        self.summary = model_summary(cfg.model, cfg.train.seq_len, batch_size=cfg.train.batch_size)
        self.peak = peak_tflops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum * self.world_size

    # ---------------------------------------------------------------- setup
    def _seed(self) -> None:
        import random

        seed = self.cfg.train.seed
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)

    def _build(self) -> None:
        cfg = self.cfg
        self.data_path = ensure_data(cfg, log=self.log)
        # The loader refuses shards written by another tokenizer than the one the config names.
        expect_sha = Tokenizer.load(cfg.data.tokenizer).sha256 if not cfg.data.mixture else None
        common = dict(
            seq_len=cfg.train.seq_len,
            batch_size=cfg.train.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=cfg.train.seed,
            expect_tokenizer_sha256=expect_sha,
            verify=cfg.data.verify_shards,
        )
        self.loader = open_loader(self.data_path, split="train", **common)
        self.val_loader = open_loader(self.data_path, split="val", **common)
        if self.loader.vocab_size > cfg.model.vocab_size:
            raise SetupError(
                f"the data's tokenizer has {self.loader.vocab_size} tokens but model.vocab_size = {cfg.model.vocab_size}; "
                f"set model.vocab_size ≥ {self.loader.vocab_size} (a multiple of 64 is fastest)"
            )
        self._seed()
        self.model = Transformer(cfg.model)
        self.model.init_weights(cfg.train.seed)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=self.device.type == "cuda")
        self.expert_names = expert_names(self.model)
        self.forward = torch.compile(self.model) if cfg.runtime.compile else self.model
        self.val_set = [self._to_device(b) for b in self.val_loader.val_batches(cfg.eval.eval_batches)]

    def _to_device(self, batch):
        x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in batch)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def _resume(self) -> dict[str, Any] | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            if ckpt.find_latest(self.ckpt_root) is not None:
                raise ckpt.CheckpointError(
                    f"checkpoint.resume = 'never' but {self.ckpt_root} already holds checkpoints. "
                    "Use resume = 'auto' to continue that run, or choose another runtime.run_name / checkpoint.dir."
                )
            return None
        path = ckpt.find_latest(self.ckpt_root) if mode == "auto" else Path(mode)
        if mode != "auto" and path.is_dir() and not (path / "meta.json").exists():
            path = ckpt.find_latest(path) or path  # a run's folder: its latest checkpoint
        if path is None:
            return None
        meta = ckpt.read_meta(path)
        ckpt.check_compatible(meta, self.cfg.fingerprint, fingerprint_items(self.cfg), self.world_size, path)
        meta = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.loader.load_state_dict(meta["loader"])
        ckpt.restore_rng(meta["rng"])
        self.log(f"[nmoe] resumed from {path} (step {meta['step']}, {meta['tokens_seen']:,} tokens seen)")
        return meta

    # ---------------------------------------------------------------- steps
    def _nvtx(self, name: str):
        if self.cfg.runtime.nvtx and self.device.type == "cuda":
            return torch.cuda.nvtx.range(name)
        return contextlib.nullcontext()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _loss(self, x: torch.Tensor, y: torch.Tensor, eager: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, router aux loss) of one batch; eager=True bypasses torch.compile (for hooks)."""
        with self._autocast():
            out = (self.model if eager else self.forward)(x)
        logits = out.logits
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        return ce, out.aux_loss

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad_norm) on device."""
        cfg = self.cfg
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        total = torch.zeros((), device=self.device)
        for _ in range(cfg.train.grad_accum):
            x, y = self._to_device(self.loader.next_batch())
            with self._nvtx("forward"):
                ce, aux = self._loss(x, y)
            with self._nvtx("backward"):
                ((ce + aux) / cfg.train.grad_accum).backward()
            total += ce.detach() / cfg.train.grad_accum
        with self._nvtx("optimizer"):
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self.last_batch = (x, y)
        return total, grad_norm

    def _apply(self, grad_norm: torch.Tensor) -> None:
        """Clip (only now that the norm is known finite, so the locator saw raw gradients) and step."""
        with self._nvtx("optimizer"):
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(
                    self.model.parameters(), self.cfg.train.grad_clip, grad_norm, foreach=True
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.model.update_expert_bias()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the fixed validation set; leaves every model buffer as it was.

        The MoE routers count their load on every forward (eval too) into non-persistent buffers that
        the next expert-bias update reads; validation must not feed them, or a run resumed from a
        checkpoint taken right after an evaluation would update the bias differently (no bitwise resume)
        and the router diagnostics would mix in validation batches.
        """
        saved = [(b, b.clone()) for b in self.model.buffers()]
        self.model.eval()
        try:
            losses = [self._loss(x, y)[0] for x, y in self.val_set]
        finally:
            self.model.train()
            for buf, value in saved:
                buf.copy_(value)
        return float(torch.stack(losses).mean())

    def _locate_nonfinite(self) -> str:
        """Name the first module whose output (or parameter gradient) is not finite."""
        found: list[str] = []
        hooks = []
        for name, module in self.model.named_modules():

            def hook(mod, args, out, name=name):
                tensors = out if isinstance(out, (tuple, list)) else (out,)
                if not found and any(
                    torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all() for t in tensors
                ):
                    found.append(name or "<model>")

            hooks.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self._loss(*self.last_batch, eager=True)  # module hooks need the eager model
        finally:
            for h in hooks:
                h.remove()
        if found:
            return f"forward output of `{found[0]}`"
        for name, p in self.model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"gradient of `{name}` (forward was finite)"
        return "not reproducible on the last batch"

    # ---------------------------------------------------------------- io
    def _meta(self, step: int) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "fingerprint": self.cfg.fingerprint,
            "fingerprint_items": fingerprint_items(self.cfg),
            "world_size": self.world_size,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "rng": ckpt.capture_rng(),
            "git_rev": self.git_rev,
            "target_reached": self.target_reached,
            "val_loss": self.last_val_loss,
            "config_toml": self.cfg.to_toml(),
        }

    def save(self, step: int) -> Path:
        try:
            path = ckpt.save_checkpoint(
                self.ckpt_root,
                step,
                self.model,
                self.optimizer,
                self._meta(step),
                is_expert=self.expert_names.__contains__,
                keep_last=self.cfg.checkpoint.keep_last,
            )
        except OSError as e:
            raise ckpt.CheckpointError(
                f"could not write the step {step} checkpoint under {self.ckpt_root}: {e}. "
                f"Last good checkpoint: {self.last_checkpoint or 'none'}. Free space or fix checkpoint.dir, "
                "then rerun the same command to resume from it."
            ) from None
        self.last_checkpoint = path
        self.registry.checkpoint(
            self.run_id, step, {"train/loss": self.last_loss} if self.last_loss is not None else {}
        )
        return path

    def _log_line(self, step: int, loss: float, lr: float, tok_s: float, eta_s: float) -> str:
        util = mfu(self.summary.flops_per_token, tok_s, self.peak)
        mfu_txt = (
            f"MFU {util * 100:.1f}%"
            if util is not None
            else ("MFU n/a (CPU)" if self.device.type == "cpu" else "MFU n/a (unknown GPU)")
        )
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        mem_txt = f"mem {mem:.1f} GiB | " if self.device.type == "cuda" else ""
        return (
            f"step {step}/{self.cfg.train.steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s / 1e3:.1f}k tok/s | "
            f"{mfu_txt} | {mem_txt}ETA {_fmt_time(eta_s)}"
        )

    # ---------------------------------------------------------------- run
    def _check_outputs(self) -> None:
        """Fail before data prep and training, not at the first save, when an output folder cannot be written."""
        cfg = self.cfg
        outputs = (
            ("checkpoint.dir", cfg.checkpoint.dir, self.ckpt_root),
            ("metrics.dir", cfg.metrics.dir, Path(cfg.metrics.dir)),
            ("metrics.experiments_db", cfg.metrics.experiments_db, Path(cfg.metrics.experiments_db).parent),
        )
        for key, value, folder in outputs:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".nmoe-write-probe-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise SetupError(
                    f"{key} = {value!r}: cannot write to {folder} ({e.strerror or e}). "
                    f"Point {key} at a writable location (--set {key}=...)."
                ) from None

    def run(self) -> RunResult:
        cfg = self.cfg
        self._check_outputs()
        ckpt.remove_stale_temporaries(self.ckpt_root)
        self._build()
        self.git_rev = ckpt.git_revision(Path(__file__).parent)
        self.tokens_seen = 0
        self.last_loss: float | None = None
        self.last_checkpoint: Path | None = ckpt.find_latest(self.ckpt_root)
        meta = self._resume()
        start = meta["step"] if meta else 0
        self.step_reached = start
        self.tokens_seen = meta["tokens_seen"] if meta else 0
        self.target_reached = bool(meta.get("target_reached", False)) if meta else False
        self.last_val_loss: float | None = meta.get("val_loss") if meta else None
        self.run_id = meta["run_id"] if meta else f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.fingerprint[:6]}"
        self.log(
            f"[nmoe] run {self.run_id} | config {cfg.source} | fingerprint {cfg.fingerprint[:16]} | device {self._device_name()}"
        )
        self.log(
            f"[nmoe] {self.summary.total_params / 1e6:.1f}M params ({self.summary.active_params / 1e6:.1f}M active), "
            f"{self.summary.flops_per_token / 1e9:.3f} GFLOP/token, {self.tokens_per_step:,} tokens/step"
        )
        self.registry = Registry(cfg.metrics.experiments_db)
        self.registry.start(
            self.run_id,
            name=cfg.name,
            config_toml=cfg.to_toml(),
            fingerprint=cfg.fingerprint,
            git_rev=self.git_rev,
            world_size=self.world_size,
            device=self._device_name(),
        )
        self.metrics: MetricsWriter | None = None
        result = RunResult(self.run_id, "failed", start)
        try:  # from here on every exit gives the registry row a final status
            self.metrics = MetricsWriter(
                cfg.metrics.dir,
                self.run_id,
                rank=self.rank,
                flush_every_s=cfg.metrics.flush_every_s,
                resume_step=start if meta else None,
                meta={"config": cfg.source, "fingerprint": cfg.fingerprint, "git_rev": self.git_rev},
            )
            with _StopFlag() as stop:
                result = self._loop(start, stop)
        except KeyboardInterrupt:
            self.registry.finish(self.run_id, "interrupted", {}, step=self.step_reached)
            raise
        except BaseException:
            self.registry.finish(self.run_id, "failed", {}, step=self.step_reached)
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
        self.registry.finish(self.run_id, result.status, _final_metrics(result), step=result.step)
        return result

    def _device_name(self) -> str:
        return (
            torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else f"cpu ({os.cpu_count()} cores, {socket.gethostname()})"
        )

    def _loop(self, start: int, stop: _StopFlag) -> RunResult:
        cfg = self.cfg
        result = RunResult(self.run_id, "completed", start, val_loss=self.last_val_loss)
        if self.target_reached or start >= cfg.train.steps:
            why = (
                f"its target val loss {cfg.eval.target_loss} was reached"
                if self.target_reached
                else "all steps are done"
            )
            self.log(
                f"[nmoe] run {self.run_id} already finished at step {start} ({why}); nothing to train. "
                "To train more, start a new run under another runtime.run_name."
            )
            return result
        bar = _progress(cfg, start)
        window_t, window_tokens = time.perf_counter(), 0
        run_t0, run_tokens0 = window_t, self.tokens_seen
        step = start
        while step < cfg.train.steps:
            loss_t, norm_t = self.train_step(step)
            loss, norm = (float(v) for v in torch.stack([loss_t, norm_t.float()]).cpu())  # one sync per step
            if not (math.isfinite(loss) and math.isfinite(norm)):
                where = self._locate_nonfinite()
                raise NonFiniteError(
                    f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step + 1} "
                    f"(loss {loss}, grad norm {norm}); first seen in the {where}. The optimizer step was not applied. "
                    f"Last good checkpoint: {self.last_checkpoint or 'none'} — lower optim.lr or raise optim.warmup, then resume from it."
                )
            self._apply(norm_t)
            step += 1
            self.step_reached = step
            self.tokens_seen += self.tokens_per_step
            window_tokens += self.tokens_per_step
            self.last_loss = loss
            result.losses[step] = loss
            lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_scale", 1.0)
            values = {
                "train/loss": loss,
                "train/grad_norm": norm,
                "train/lr": lr,
                "train/tokens_seen": float(self.tokens_seen),
            }
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                values.update(self._window_metrics(step, loss, lr, window_t, window_tokens, run_t0, run_tokens0, bar))
                window_t, window_tokens = time.perf_counter(), 0
            is_last = step == cfg.train.steps
            if (cfg.eval.eval_every and step % cfg.eval.eval_every == 0) or is_last:
                result.val_loss = self.last_val_loss = self.evaluate()
                values["val/loss"] = result.val_loss
                _write(bar, self.log, f"step {step}/{cfg.train.steps} | val loss {result.val_loss:.4f}")
            self.metrics.log(step, values)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            reached = (
                cfg.eval.target_loss > 0 and result.val_loss is not None and result.val_loss <= cfg.eval.target_loss
            )
            if reached:
                self.target_reached = True
                _write(
                    bar,
                    self.log,
                    f"[nmoe] target val loss {cfg.eval.target_loss} reached at step {step} ({self.tokens_seen:,} tokens)",
                )
            self._inject_fault(step, "TERM")
            if (
                (cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0)
                or is_last
                or reached
                or stop.signal
            ):
                result.checkpoint = self.save(step)
            result.step = step
            self._inject_fault(step, "KILL")
            if reached:
                break
            if stop.signal:
                name = signal.Signals(stop.signal).name
                _write(
                    bar,
                    self.log,
                    f"[nmoe] {name}: saved {result.checkpoint} at step {step}; rerun the same command to resume",
                )
                result.status = "interrupted"
                result.stop_signal = stop.signal
                break
        if bar is not None:
            bar.close()
        return result

    def _inject_fault(self, step: int, phase: str) -> None:
        """Fault injection for the resume tests: NMOE_FAULT_AT_STEP='N:KILL' (phase KILL: after step N's
        checkpoint, no cleanup at all) or 'N:TERM' / 'N:INT' (phase TERM: the signal arrives during step N)."""
        at, _, sig = os.environ.get("NMOE_FAULT_AT_STEP", "").partition(":")
        sig = sig.upper()
        if not at or int(at) != step or (phase == "KILL") != (sig == "KILL"):
            return
        if sig == "KILL":
            self.metrics.flush()
        os.kill(os.getpid(), {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}[sig])

    def _window_metrics(self, step, loss, lr, window_t, window_tokens, run_t0, run_tokens0, bar) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        tok_s = window_tokens / max(now - window_t, 1e-9)
        run_rate = (self.tokens_seen - run_tokens0) / max(now - run_t0, 1e-9)
        eta = (self.cfg.train.steps - step) * self.tokens_per_step / max(run_rate, 1e-9)
        _write(bar, self.log, self._log_line(step, loss, lr, tok_s, eta))
        values = {"perf/tokens_per_s": tok_s, "perf/step_time_s": self.tokens_per_step / max(tok_s, 1e-9)}
        util = mfu(self.summary.flops_per_token, tok_s, self.peak)
        if util is not None:
            values["perf/mfu"] = util
        if self.device.type == "cuda":
            values["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        values.update(self.model.router_stats().as_scalars())
        return values


def _final_metrics(result: RunResult) -> dict[str, float]:
    out = {"step": float(result.step)}
    if result.losses:
        out["train/loss"] = result.losses[max(result.losses)]
    if result.val_loss is not None:
        out["val/loss"] = result.val_loss
    return out


def _progress(cfg: Config, start: int):
    if not cfg.runtime.progress:
        return None
    import sys

    from tqdm.auto import tqdm

    # On a terminal: a live bar. In a log file: no carriage-return spam; the console lines carry progress.
    return tqdm(
        total=cfg.train.steps,
        initial=start,
        desc=cfg.name,
        unit="step",
        dynamic_ncols=True,
        leave=True,
        disable=not sys.stderr.isatty(),
    )


def _write(bar, log, text: str) -> None:
    if bar is not None:
        bar.write(text)
    else:
        log(text)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
