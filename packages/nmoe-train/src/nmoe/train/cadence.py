"""When to log, evaluate and save: the one place that reads the cadence keys."""

from __future__ import annotations

from dataclasses import dataclass

from nmoe.train.config import Config


@dataclass(frozen=True)
class Cadence:
    """Step cadence of a run of `last_step` steps (1-based step numbers)."""

    log_every: int
    eval_every: int
    save_every: int
    last_step: int

    @classmethod
    def of(cls, cfg: Config, last_step: int) -> Cadence:
        """The cadence of cfg for a run ending at `last_step`."""
        return cls(cfg.train.log_every, cfg.eval.eval_every, cfg.checkpoint.save_every, last_step)

    def log(self, step: int) -> bool:
        """A console line and perf/router metrics after this step."""
        return step % self.log_every == 0 or step == self.last_step

    def evaluate(self, step: int) -> bool:
        """A validation loss after this step (always after the last one)."""
        return bool(self.eval_every and step % self.eval_every == 0) or step == self.last_step

    def save(self, step: int) -> bool:
        """A checkpoint after this step (always after the last one)."""
        return bool(self.save_every and step % self.save_every == 0) or step == self.last_step
