"""A run's records: the registry row (rank 0) and each rank's metrics file, closed with a final status.

Every exit after `open()` gives the registry row a final status (completed, interrupted, failed), and a
checkpoint flushes the metrics first, so the metrics up to a checkpoint's step survive any later crash.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from nmoe.metrics import MetricsWriter, Registry
from nmoe.train.config import Config
from nmoe.train.runtime import SetupError


class RunRecord:
    """Registry row + per-rank MetricsWriter of one run on one rank."""

    def __init__(self, cfg: Config, run_id: str, rank: int, world_size: int, device: str, git_rev: str):
        self.cfg, self.run_id, self.rank = cfg, run_id, rank
        self.world_size, self.device, self.git_rev = world_size, device, git_rev
        self.registry: Registry | None = None
        self.metrics: MetricsWriter | None = None

    def open(self, resume_step: int | None) -> None:
        """Register the run (rank 0) and open this rank's metrics file (dropping rows past resume_step)."""
        cfg = self.cfg
        if self.rank == 0:
            try:
                self.registry = Registry(cfg.metrics.experiments_db)
                self.registry.start(
                    self.run_id,
                    name=cfg.name,
                    config_toml=cfg.to_toml(),
                    fingerprint=cfg.fingerprint,
                    git_rev=self.git_rev,
                    world_size=self.world_size,
                    device=self.device,
                )
            except sqlite3.DatabaseError as err:
                raise SetupError(
                    f"the experiment registry {cfg.metrics.experiments_db} is damaged ({err}): move it aside (it is "
                    "rebuilt empty) or point metrics.experiments_db elsewhere"
                ) from None
        self.metrics = MetricsWriter(
            cfg.metrics.dir,
            self.run_id,
            rank=self.rank,
            flush_every_s=cfg.metrics.flush_every_s,
            resume_step=resume_step,
            meta={"config": cfg.source, "fingerprint": cfg.fingerprint, "git_rev": self.git_rev},
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.metrics.log(step, dict(values))

    def log_arrays(self, step: int, arrays: Mapping[str, Sequence[float]]) -> None:
        """Per-expert (or other vector) values, stored compactly when the metrics writer supports it."""
        if hasattr(self.metrics, "log_array"):
            for tag, values in arrays.items():
                self.metrics.log_array(step, tag, list(values))

    def flush(self) -> None:
        """Block until every metric logged so far is on disk (called before each checkpoint)."""
        if self.metrics is not None:
            self.metrics.flush()

    def checkpointed(self, step: int, values: Mapping[str, float]) -> None:
        if self.registry is not None:
            self.registry.checkpoint(self.run_id, step, dict(values))

    def close(self, status: str, final: Mapping[str, float], step: int) -> None:
        """Flush and close the metrics, then give the registry row its final status."""
        try:
            if self.metrics is not None:
                self.metrics.close()
        finally:
            if self.registry is not None:
                self.registry.finish(self.run_id, status, dict(final), step=step)


def final_values(step: int, losses: Mapping[int, float], val_loss: float | None, extra: Mapping[str, Any]) -> dict:
    """The registry's final metrics of a run."""
    out = {"step": float(step), **{k: float(v) for k, v in extra.items()}}
    if losses:
        out["train/loss"] = losses[max(losses)]
    if val_loss is not None:
        out["val/loss"] = val_loss
    return out
