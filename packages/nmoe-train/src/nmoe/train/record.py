"""A run's records: the registry row (rank 0) and each rank's metrics file, closed with a final status.

Every exit after `open()` gives the registry row a final status (completed, interrupted, failed), and a
checkpoint flushes the metrics first, so the metrics up to a checkpoint's step survive any later crash.
A metrics file or registry that cannot be written (a full disk) is a RecordError naming it; while the run
is already failing, closing the records only warns, so the run's own error is the one reported.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from nmoe.metrics import MetricsWriter, Registry
from nmoe.metrics.writer import MetricsFileError
from nmoe.train.config import Config
from nmoe.train.runtime import SetupError


class RecordError(RuntimeError):
    """The run's metrics file or registry row could not be written; the message names it and the remedy."""


class RunRecord:
    """Registry row + per-rank MetricsWriter of one run on one rank."""

    def __init__(self, cfg: Config, run_id: str, rank: int, world_size: int, device: str, git_rev: str):
        self.cfg, self.run_id, self.rank = cfg, run_id, rank
        self.world_size, self.device, self.git_rev = world_size, device, git_rev
        self.registry: Registry | None = None
        self.metrics: MetricsWriter | None = None
        self._raised: set[str] = set()  # RecordErrors already on their way (close() does not repeat them)

    def open(self, resume_step: int | None) -> None:
        """Register the run (rank 0) and open this rank's metrics file, dropping rows past resume_step.

        A fresh run (resume_step None) drops every row under its id: a run id is the run name, the start time
        to the second and the fingerprint, so a run restarted within the same second after dying before its
        first checkpoint gets the same id, and none of its predecessor's rows are backed by a checkpoint.
        """
        cfg = self.cfg
        if self.rank == 0:
            with self._writing_registry():
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
        try:
            self.metrics = MetricsWriter(
                cfg.metrics.dir,
                self.run_id,
                rank=self.rank,
                flush_every_s=cfg.metrics.flush_every_s,
                resume_step=0 if resume_step is None else resume_step,
                meta={"config": cfg.source, "fingerprint": cfg.fingerprint, "git_rev": self.git_rev},
            )
        except MetricsFileError as err:
            raise SetupError(
                f"{err}: it is damaged. Move it aside and rerun (the run goes on and records its metrics in a new "
                "file; the moved one keeps the history so far), or point metrics.dir elsewhere"
            ) from None

    def log(self, step: int, values: Mapping[str, float]) -> None:
        with self._writing_metrics():
            self.metrics.log(step, dict(values))

    def log_arrays(self, step: int, arrays: Mapping[str, Sequence[float]]) -> None:
        """Per-expert (or other vector) values, stored compactly when the metrics writer supports it."""
        if hasattr(self.metrics, "log_array"):
            with self._writing_metrics():
                for tag, values in arrays.items():
                    self.metrics.log_array(step, tag, list(values))

    def flush(self) -> None:
        """Block until every metric logged so far is on disk (called before each checkpoint)."""
        if self.metrics is not None:
            with self._writing_metrics():
                self.metrics.flush()

    def checkpointed(self, step: int, values: Mapping[str, float]) -> None:
        if self.registry is not None:
            with self._writing_registry():
                self.registry.checkpoint(self.run_id, step, dict(values))

    def close(self, status: str, final: Mapping[str, float], step: int) -> None:
        """Flush and close the metrics, then give the registry row its final status.

        RecordError when either cannot be written; only a warning on stderr when status is 'failed' (the run's
        own error is already on its way and must not be replaced by this one).
        """
        problems = []
        try:
            if self.metrics is not None:
                with self._writing_metrics():
                    self.metrics.close()
        except RecordError as err:
            problems += [str(err)] if str(err) not in self._raised else []
        try:
            if self.registry is not None:
                with self._writing_registry():
                    self.registry.finish(self.run_id, status, dict(final), step=step)
        except RecordError as err:
            problems += [str(err)] if str(err) not in self._raised else []
        if problems and status == "failed":
            print(f"nmoe-train: warning: {' '.join(problems)}", file=sys.stderr, flush=True)
        elif problems:
            raise RecordError(" ".join(problems))

    def _error(self, message: str) -> RecordError:
        self._raised.add(message)
        return RecordError(message)

    @contextlib.contextmanager
    def _writing_metrics(self) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, OSError) as err:  # the writer thread's failure (e.g. a full disk), re-raised here
            cause = err.__cause__ or err
            raise self._error(
                f"could not write the metrics file {self.metrics.path} ({str(cause).splitlines()[0]}). Free space "
                "or fix metrics.dir, then rerun the same command to resume from the last checkpoint."
            ) from None

    @contextlib.contextmanager
    def _writing_registry(self) -> Iterator[None]:
        db = self.cfg.metrics.experiments_db
        try:
            yield
        except sqlite3.OperationalError as err:  # I/O: a full disk, a lock held for too long
            raise self._error(
                f"could not write the experiment registry {db} ({err}). Free space or fix metrics.experiments_db, "
                "then rerun the same command to resume from the last checkpoint."
            ) from None
        except sqlite3.DatabaseError as err:  # not a database, or a malformed one
            raise self._error(
                f"the experiment registry {db} is damaged ({err}): move it aside (it is rebuilt empty) or point "
                "metrics.experiments_db elsewhere"
            ) from None


def final_values(step: int, losses: Mapping[int, float], val_loss: float | None, extra: Mapping[str, Any]) -> dict:
    """The registry's final metrics of a run."""
    out = {"step": float(step), **{k: float(v) for k, v in extra.items()}}
    if losses:
        out["train/loss"] = losses[max(losses)]
    if val_loss is not None:
        out["val/loss"] = val_loss
    return out
