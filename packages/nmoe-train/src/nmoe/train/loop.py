"""The training loop: `Trainer(cfg).run()` on one process, or on every rank of a torchrun world."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from nmoe.data import Tokenizer, open_loader
from nmoe.model import model_summary
from nmoe.train import checkpoint as ckpt
from nmoe.train.cadence import Cadence
from nmoe.train.checkpointer import Checkpointer
from nmoe.train.config import Config
from nmoe.train.core_eval import CoreBundleError, check_bundle
from nmoe.train.data_setup import ensure_data, needs_prep
from nmoe.train.diagnostics import locate_nonfinite
from nmoe.train.distributed import World, init_world
from nmoe.train.finish import append_to_leaderboard, core_values, run_core
from nmoe.train.grads import global_grad_norm, reduce_gradients_, split_params
from nmoe.train.mfu import peak_tflops
from nmoe.train.model_setup import build_model
from nmoe.train.nvfp4 import precision_metrics
from nmoe.train.optim import build_optimizer, expert_names, set_lr
from nmoe.train.record import RunRecord, final_values
from nmoe.train.report import Console, Throughput, perf_values, step_line
from nmoe.train.runtime import SetupError, plan_run, world_size_from_env
from nmoe.train.schedule import lr_at
from nmoe.train.signals import StopFlag
from nmoe.train.state import TrainState


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


class Hook(Protocol):
    """Extension points called on every rank (the tests inject faults through them)."""

    def during_step(self, trainer: Trainer, step: int) -> None:
        """After step `step`'s forward and backward, before the ranks agree on its outcome."""

    def after_save(self, trainer: Trainer, step: int) -> None:
        """After step `step` is done and its checkpoint (if any) is written."""


class Trainer:
    """Builds everything a run needs from a Config (`__init__`), then trains it (`run()`)."""

    def __init__(self, cfg: Config, log=print, hooks: Sequence[Hook] = ()):
        self.cfg, self.hooks = cfg, list(hooks)
        self.plan = plan_run(cfg, world_size_from_env())
        self.world: World = init_world(self.plan, cfg.parallel.backend, cfg.parallel.wait_timeout_s)
        self.log = log if self.world.is_main else (lambda text: None)
        self.device = self.world.device
        self.lock = self.world.agree(self._claim_outputs, "checking the output folders")
        self.loader, self.val_set = self._open_data()
        self.model, self.shard, nvfp4 = build_model(cfg, self.plan, self.world)
        self.optimizer = build_optimizer(
            self.model, cfg.optim, fused=self.device.type == "cuda", nvfp4_stores=nvfp4, seed=cfg.train.seed
        )
        self.dense_params, self.expert_params = split_params(self.model, expert_names(self.model))
        self.forward = torch.compile(self.model) if cfg.runtime.compile else self.model
        self.checkpoints = Checkpointer(cfg, self.world, self.model, self.optimizer, self.shard, self.log)
        self.resumed = self.checkpoints.resume(self.loader)
        fresh = TrainState.fresh(cfg.name, cfg.fingerprint)
        self.state = self.resumed or TrainState(run_id=self.world.gather_objects(fresh.run_id)[0])
        self.summary = model_summary(
            cfg.model,
            cfg.train.seq_len,
            self.plan.micro_batch,
            act_bytes=self.plan.act_bytes,
            checkpointing=cfg.runtime.activation_checkpointing,
        )
        self.peak = peak_tflops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.git_rev = ckpt.git_revision(Path(__file__).parent)
        self.last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_perf: dict[str, float] = {}

    # ------------------------------------------------------------------------------------ setup
    def _claim_outputs(self) -> ckpt.RunLock | None:
        """Fail before data prep when an output folder cannot be written; take the run's lock (rank 0)."""
        if not self.world.is_main:
            return None
        cfg = self.cfg
        root = Path(cfg.checkpoint.dir) / cfg.name
        outputs = (
            ("checkpoint.dir", cfg.checkpoint.dir, root),
            ("metrics.dir", cfg.metrics.dir, Path(cfg.metrics.dir)),
            ("metrics.experiments_db", cfg.metrics.experiments_db, Path(cfg.metrics.experiments_db).parent),
        )
        if needs_prep(cfg):  # prepared data may sit in a read-only folder
            outputs += (("data.data_dir", cfg.data.data_dir, Path(cfg.data.data_dir)),)
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
        if cfg.eval.core_bundle:  # found missing now, not after a long run
            try:
                check_bundle(cfg.eval.core_bundle)
            except CoreBundleError as err:
                raise SetupError(f"eval.core_bundle = {cfg.eval.core_bundle!r}: {err}") from None
        lock = ckpt.RunLock(root)
        lock.acquire()
        ckpt.remove_stale_temporaries(root)
        return lock

    def _open_data(self):
        cfg, plan, world = self.cfg, self.plan, self.world
        path = world.agree(lambda: ensure_data(cfg, log=self.log) if world.is_main else None, "preparing data")
        path = world.gather_objects(path)[0]

        def open_both():
            # The loader refuses shards written by another tokenizer than the one the config names.
            expect_sha = Tokenizer.load(cfg.data.tokenizer).sha256 if not cfg.data.mixture else None
            common = dict(
                seq_len=cfg.train.seq_len,
                batch_size=plan.micro_batch,
                rank=world.rank,
                world_size=world.world_size,
                seed=cfg.train.seed,
                expect_tokenizer_sha256=expect_sha,
                verify=cfg.data.verify_shards,
                vocab_limit=cfg.model.vocab_size,
            )
            loader = open_loader(path, split="train", **common)
            val_loader = open_loader(path, split="val", **common)
            if loader.vocab_size > cfg.model.vocab_size:
                raise SetupError(
                    f"the data's tokenizer has {loader.vocab_size} tokens but model.vocab_size = "
                    f"{cfg.model.vocab_size}; set model.vocab_size ≥ {loader.vocab_size} (a multiple of 64 is fastest)"
                )
            return loader, val_loader.val_batches(cfg.eval.eval_batches)

        loader, val_batches = world.agree(open_both, "opening the data")
        return loader, [self._to_device(b) for b in val_batches]

    def _to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in batch)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    # ------------------------------------------------------------------------------------ one step
    def _nvtx(self, name: str):
        if self.cfg.runtime.nvtx and self.device.type == "cuda":
            return torch.cuda.nvtx.range(name)
        return contextlib.nullcontext()

    def _autocast(self):
        if self.plan.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.plan.amp_dtype)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eager: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy, router aux loss) of one micro-batch; eager=True bypasses torch.compile.

        The output head is fused into the loss (nmoe.kernels.linear_cross_entropy): no [B*S, V] logits.
        """
        with self._autocast():
            out = (self.model if eager else self.forward)(x, y)
        return out.loss, out.aux_loss

    def train_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over this rank's micro-batches and the gradient reductions -> (loss part, grad norm).

        The loss part is this rank's share of the global mean loss (summing it over ranks gives the mean).
        """
        set_lr(self.optimizer, lr)
        scale = 1.0 / (self.plan.grad_accum * self.plan.world_size)
        total = torch.zeros((), device=self.device)
        for _ in range(self.plan.grad_accum):
            x, y = self._to_device(self.loader.next_batch())
            with self._nvtx("forward"):
                ce, aux = self.loss(x, y)
            with self._nvtx("backward"):
                ((ce + aux) * scale).backward()
            total += ce.detach() * scale
        self.last_batch = (x, y)
        with self._nvtx("gradients"):
            reduce_gradients_(self.dense_params, self.expert_params, self.world)
            norm = global_grad_norm(self.dense_params, self.expert_params, self.world)
        return total, norm

    def _agree_on_step(self, loss: torch.Tensor, norm: torch.Tensor, stop: StopFlag) -> tuple[float, float, int]:
        """The step's one host sync: global loss, grad norm, and the stop signal any rank received (0: none)."""
        signum = float(stop.signal or 0)
        shared = torch.stack([loss, loss.new_tensor(signum > 0), loss.new_tensor(signum)])
        self.world.all_reduce_sum_(shared)
        loss_v, stops, signums, norm_v = torch.cat([shared, norm.float().reshape(1)]).cpu().tolist()
        return loss_v, norm_v, round(signums / stops) if stops else 0

    def apply_update(self, grad_norm: torch.Tensor) -> None:
        """Clip (only once the norm is known finite, so the locator saw raw gradients), step, rebalance experts."""
        with self._nvtx("optimizer"):
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(
                    self.model.parameters(), self.cfg.train.grad_clip, grad_norm, foreach=True
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.model.update_expert_bias(self._sum_over_world)

    def _sum_over_world(self, tensor: torch.Tensor) -> None:
        self.world.all_reduce_sum_(tensor)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the fixed validation set of all ranks (the model counts no router load in eval)."""
        self.model.eval()
        try:
            local = torch.stack([self.loss(x, y)[0] for x, y in self.val_set]).mean()
        finally:
            self.model.train()
        return float(self.world.all_reduce_sum_(local.float()) / self.world.world_size)

    def _nonfinite(self, step: int, loss: float, norm: float) -> NonFiniteError:
        where = locate_nonfinite(self.model, lambda: self.loss(*self.last_batch, eager=True))
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        return NonFiniteError(
            f"non-finite {what} at step {step} (loss {loss}, grad norm {norm}); first seen in the {where}"
            f"{f' on rank {self.world.rank}' if self.world.is_distributed else ''}. The optimizer step was not "
            f"applied. Last good checkpoint: {self.checkpoints.last_good or 'none'} — lower optim.lr or raise "
            "optim.warmup, then resume from it."
        )

    def _lr(self, step: int) -> float:
        """Learning rate of 1-based `step`; steps past train.steps (--extend-steps) keep the schedule's last lr."""
        steps = self.cfg.train.steps
        return lr_at(min(step, steps) - 1, steps, self.cfg.optim)

    def extend(self, extra_steps: int) -> None:
        """Train until train.steps + extra_steps; the extra steps keep the schedule's final lr (recorded in meta)."""
        if extra_steps <= self.state.extra_steps:
            return
        self.state.extra_steps = extra_steps
        steps = self.cfg.train.steps
        target = " A reached target val loss no longer stops the run." if self.cfg.eval.target_loss else ""
        self.log(
            f"[nmoe] extending the run to {steps + extra_steps} steps: steps after {steps} use the schedule's "
            f"final learning rate {self._lr(steps):.3e}.{target}"
        )

    # ------------------------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        """Train to train.steps (or the target val loss, or a stop signal); checkpoint; return the outcome."""
        state = self.state
        record = RunRecord(
            self.cfg, state.run_id, self.world.rank, self.world.world_size, self.device_name(), self.git_rev
        )
        result = RunResult(state.run_id, "failed", state.step, val_loss=state.last_val_loss)
        try:
            record.open(resume_step=state.step if self.resumed else None)
            self._announce()
            with StopFlag() as stop:
                result = self._train(record, stop)
            if result.status == "completed" and result.losses:  # trained to its end in this invocation
                self._finish(record, result)
        except KeyboardInterrupt:
            result.status = "interrupted"
            raise
        finally:
            extra = {"target_reached": float(state.target_reached), **self.last_perf}
            record.close(result.status, final_values(state.step, result.losses, state.last_val_loss, extra), state.step)
            if self.lock is not None:
                self.lock.release()
        return result

    def _announce(self) -> None:
        s, cfg = self.summary, self.cfg
        self.log(
            f"[nmoe] run {self.state.run_id} | config {cfg.source} | fingerprint {cfg.fingerprint[:16]} | "
            f"device {self.device_name()} | {self.world.world_size} rank(s), expert-parallel {self.plan.ep_size}"
        )
        self.log(
            f"[nmoe] {s.total_params / 1e6:.1f}M params ({s.active_params / 1e6:.1f}M active), "
            f"{s.flops_per_token / 1e9:.3f} GFLOP/token, {self.plan.tokens_per_step:,} tokens/step "
            f"({self.plan.micro_batch} x {self.plan.seq_len} x {self.plan.grad_accum} accum x {self.world.world_size})"
        )

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({os.cpu_count()} cores, {socket.gethostname()})"

    def _train(self, record: RunRecord, stop: StopFlag) -> RunResult:
        cfg, state, world = self.cfg, self.state, self.world
        last = cfg.train.steps + state.extra_steps
        result = RunResult(state.run_id, "completed", state.step, val_loss=state.last_val_loss)
        if (state.target_reached and not state.extra_steps) or state.step >= last:
            self._say_finished(last)
            return result
        cadence = Cadence.of(cfg, last)
        console = Console(self.log, world.is_main, cfg.runtime.progress, cfg.name, last, state.step)
        meter = Throughput(state.tokens_seen)
        while state.step < last:
            started = time.perf_counter()
            step, lr = state.step + 1, self._lr(state.step + 1)
            loss_t, norm_t = self.train_step(lr)
            for hook in self.hooks:
                hook.during_step(self, step)
            loss, norm, signum = self._agree_on_step(loss_t, norm_t, stop)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise self._nonfinite(step, loss, norm)
            self.apply_update(norm_t)
            state.advance(self.plan.tokens_per_step)
            meter.add(self.plan.tokens_per_step)
            result.losses[step] = loss
            values = {
                "train/loss": loss,
                "train/grad_norm": norm,
                "train/lr": lr,
                "train/tokens_seen": state.tokens_seen,
            }
            if cadence.log(step):
                values.update(self._window_metrics(step, last, loss, lr, meter, console, record))
                self.last_perf = {k: values[k] for k in ("perf/tokens_per_s", "perf/mfu") if k in values}
            if cadence.evaluate(step):
                result.val_loss = state.last_val_loss = self.evaluate()
                values["val/loss"] = result.val_loss
                console.write(f"step {step}/{last} | val loss {result.val_loss:.4f}")
            record.log(step, values if world.is_main else {k: v for k, v in values.items() if k.startswith("perf/")})
            console.tick(loss)
            target = cfg.eval.target_loss if not state.extra_steps else 0.0
            if cadence.evaluate(step) and 0 < target and result.val_loss <= target:
                state.target_reached = True
                console.write(
                    f"[nmoe] target val loss {cfg.eval.target_loss} reached at step {step} ({state.tokens_seen:,} tokens)"
                )
            reached = state.target_reached and not state.extra_steps
            state.train_seconds += time.perf_counter() - started  # before the save: it is part of the state
            if cadence.save(step) or reached or signum:
                record.flush()  # a checkpoint implies its metrics are on disk
                result.checkpoint = self.checkpoints.save(state, self.loader, {"git_rev": self.git_rev})
                record.checkpointed(step, {"train/loss": loss})
            result.step = step
            for hook in self.hooks:
                hook.after_save(self, step)
            if reached:
                break
            if signum:
                name = signal.Signals(signum).name
                console.write(
                    f"[nmoe] {name}: saved {result.checkpoint} at step {step}; rerun the same command to resume"
                )
                result.status, result.stop_signal = "interrupted", signum
                break
        console.close()
        return result

    def _finish(self, record: RunRecord, result: RunResult) -> None:
        """At the target or the last step: CORE evaluation and the leaderboard entry (when configured)."""
        core = run_core(self, result.step)
        if core is not None:
            record.log(result.step, core_values(core) if self.world.is_main else {})
            self.last_perf["core/score"] = core.score
        append_to_leaderboard(self, core)

    def _say_finished(self, last: int) -> None:
        state, cfg = self.state, self.cfg
        why = (
            f"its target val loss {cfg.eval.target_loss} was reached" if state.target_reached else "all steps are done"
        )
        self.log(
            f"[nmoe] run {state.run_id} already finished at step {state.step} ({why}); nothing to train. To train "
            f"further, rerun with --extend-steps N (N more steps at the schedule's final learning rate), or start a "
            "new run under another runtime.run_name."
        )

    def _window_metrics(self, step, last, loss, lr, meter, console, record) -> dict[str, float]:
        tok_s, seconds, run_rate = meter.take(self.state.tokens_seen, self.device)
        step_time = self.plan.tokens_per_step / max(tok_s, 1e-9)
        perf = perf_values(
            tok_s, step_time, self.summary.flops_per_token, self.world.world_size, self.peak, self.device
        )
        eta = (last - step) * self.plan.tokens_per_step / max(run_rate, 1e-9)
        console.write(step_line(step, last, loss, lr, perf, eta, cpu=self.device.type == "cpu"))
        stats = self.model.router_stats(self._sum_over_world)
        perf.update(precision_metrics(self.optimizer))  # this rank's experts (NVFP4 storage)
        if self.world.is_main:
            perf.update(stats.as_scalars())
            record.log_arrays(step, stats.expert_loads())
        return perf
