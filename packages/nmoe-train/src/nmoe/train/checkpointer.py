"""Saving and resuming a run's checkpoints on every rank (the layout and file code is in checkpoint.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nmoe.train import checkpoint as ckpt
from nmoe.train.config import Config, fingerprint_items
from nmoe.train.distributed import PeerLost, World
from nmoe.train.state import TrainState

FORMAT = "nmoe.checkpoint/2"


class NonFiniteWeights(ckpt.CheckpointError):
    """The weights hold NaN/Inf: saving them would make a 'last good checkpoint' that is not good."""


class Checkpointer:
    """One run's checkpoints: `resume()` at start, `save()` on the run's cadence; collective on every rank."""

    def __init__(
        self,
        cfg: Config,
        world: World,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        shard: ckpt.Shard,
        log: Callable[[str], None],
    ):
        self.cfg, self.world, self.model, self.optimizer, self.shard = cfg, world, model, optimizer, shard
        self.log = log
        self.root = Path(cfg.checkpoint.dir) / cfg.name
        self.last_good: Path | None = None

    # ------------------------------------------------------------------------------------ resume
    def resume(self, loader) -> TrainState | None:
        """Load the checkpoint checkpoint.resume names (verified; falls back to an older intact one for 'auto')."""
        mode = self.cfg.checkpoint.resume
        found = ckpt.candidates(self.root)
        self.last_good = found[0] if found else None
        if mode == "never":
            if found:
                raise ckpt.CheckpointError(
                    f"checkpoint.resume = 'never' but {self.root} already holds checkpoints. Use resume = 'auto' to "
                    "continue that run, or choose another runtime.run_name / checkpoint.dir."
                )
            return None
        if mode != "auto":
            path = Path(mode)
            found = ckpt.candidates(path) if path.is_dir() and not (path / ckpt.META).exists() else [path]
        if not found:
            return None
        path, meta = self._first_intact(found, fallback=mode == "auto")
        if meta.get("ep_size", 1) != self.shard.ep_size and self.cfg.model.expert_precision == "nvfp4":
            raise ckpt.CheckpointError(
                f"{path} was written with expert-parallel size {meta.get('ep_size', 1)}, this run has "
                f"{self.shard.ep_size}: NVFP4 expert storage keeps one tensor scale per rank's expert tensor, so it "
                f"cannot be re-sharded. Resume with {meta.get('ep_size', 1)} expert-parallel ranks."
            )
        self.world.agree(lambda: ckpt.load_shard(path, meta, self.model, self.optimizer, self.shard), f"loading {path}")
        loader.load_state_dict(meta["loader"])
        rngs = meta["rng"]
        ckpt.restore_rng(rngs[self.world.rank] if len(rngs) == self.world.world_size else rngs[0])
        self.last_good = path
        resharded = meta.get("ep_size", 1) != self.shard.ep_size
        note = f", experts re-sharded from {meta.get('ep_size', 1)} to {self.shard.ep_size} ranks" if resharded else ""
        self.log(
            f"[nmoe] resumed from {path} (step {meta['step']}, {meta['state']['tokens_seen']:,} tokens seen{note})"
        )
        return TrainState.from_meta(meta["state"])

    def _first_intact(self, found: list[Path], fallback: bool) -> tuple[Path, dict[str, Any]]:
        problems = []
        for path in found:
            meta, problem = self._check(path)
            if problem is None:
                if problems:
                    self.log(f"[nmoe] resuming from {path}, the newest intact checkpoint")
                return path, meta
            problems.append(f"{path}: {problem}")
            self.log(f"[nmoe] checkpoint {path} is damaged: {problem}")
            if not fallback:
                break
        listing = "\n  ".join(problems)
        raise ckpt.CheckpointError(
            f"no intact checkpoint to resume from:\n  {listing}\nMove the damaged checkpoint folder(s) aside and "
            "rerun to resume from an older one, or start afresh with checkpoint.resume = 'never' and another "
            "runtime.run_name."
        )

    def _check(self, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """(meta, None) when every file verifies, else (None, the problem); the ranks hash the files in parallel."""
        if path.is_dir() and not (path / ckpt.META).is_file():  # a save publishes its folder with meta.json
            return None, f"{ckpt.META} is missing"
        try:
            meta = ckpt.read_meta(path)
        except ckpt.CheckpointError as err:
            return None, str(err)
        if meta.get("format") != FORMAT:
            return None, f"format {meta.get('format')!r} is not {FORMAT!r} (written by another nmoe version)"
        ckpt.check_compatible(meta, self.cfg.fingerprint, fingerprint_items(self.cfg), path)
        names = ckpt.files_to_check(meta)
        mine = names[self.world.rank :: self.world.world_size]
        verdicts = self.world.gather_objects(ckpt.verify_files(path, meta, mine))
        problem = next((v for v in verdicts if v is not None), None)
        return (None, problem) if problem else (meta, None)

    # ------------------------------------------------------------------------------------ save
    def save(self, state: TrainState, loader, extra_meta: dict[str, Any]) -> Path:
        """Write checkpoint `state.step` from every rank; CheckpointError naming the last good one on failure."""
        step = state.step
        bad = self.world.gather_objects(ckpt.nonfinite_tensors(self.model))
        bad_names = sorted({name for names in bad for name in names})
        if bad_names:
            raise NonFiniteWeights(
                f"after step {step} the weights hold NaN/Inf ({', '.join(bad_names[:4])}"
                f"{', ...' if len(bad_names) > 4 else ''}); not saving them. Last good checkpoint: "
                f"{self.last_good or 'none'}. Lower optim.lr or raise optim.warmup (and check optim.eps), then "
                "resume from it."
            )
        tmp = self.root / f".{ckpt.step_dir_name(step)}.tmp"
        try:
            if self.world.is_main:
                ckpt.temporary_dir(self.root, step)
            self.world.barrier()
            writes_experts = self.world.replica == 0
            files = self.world.agree(
                lambda: (
                    ckpt.write_shard_files(tmp, self.model, self.optimizer, self.shard, writes_dense=self.world.is_main)
                    if (writes_experts or self.world.is_main)
                    else {}
                ),
                f"writing checkpoint step {step}",
            )
            all_files = {
                name: info for rank_files in self.world.gather_objects(files) for name, info in rank_files.items()
            }
            rngs = self.world.gather_objects(ckpt.capture_rng())
            meta = self._meta(state, loader, all_files, rngs, extra_meta)
            final = self.world.agree(
                lambda: (
                    ckpt.publish(self.root, tmp, step, meta, self.cfg.checkpoint.keep_last)
                    if self.world.is_main
                    else None
                ),
                f"publishing checkpoint step {step}",
            )
        except PeerLost:
            raise
        except (OSError, RuntimeError) as err:
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise ckpt.CheckpointError(
                f"could not write the step {step} checkpoint under {self.root}: {err}. Last good checkpoint: "
                f"{self.last_good or 'none'}. Free space or fix checkpoint.dir, then rerun the same command to "
                "resume from it."
            ) from None
        self.last_good = self.root / ckpt.step_dir_name(step) if final is None else final
        return self.last_good

    def _meta(self, state: TrainState, loader, files, rngs, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "state": state.to_meta(),
            "run_id": state.run_id,
            "fingerprint": self.cfg.fingerprint,
            "fingerprint_items": fingerprint_items(self.cfg),
            "world_size": self.world.world_size,
            "ep_size": self.shard.ep_size,
            "n_experts": self.shard.n_experts,
            "loader": loader.state_dict(),
            "rng": rngs,
            "files": files,
            "config_toml": self.cfg.to_toml(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
            **extra,
        }
