"""TrainState: where a run stands, serialised into every checkpoint's meta.json."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainState:
    """Progress of one run: everything besides tensors and the loader cursor that a resume restores."""

    run_id: str
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    target_reached: bool = False
    last_val_loss: float | None = None
    extra_steps: int = 0  # steps added past the config's train.steps by `--extend-steps`
    train_seconds: float = 0.0  # wall clock spent in training steps, over every resume (time to target)

    @classmethod
    def fresh(cls, run_name: str, fingerprint: str) -> TrainState:
        """A new run's state with a unique run id `{name}-{yyyymmdd-HHMMSS}-{fingerprint[:6]}`."""
        return cls(run_id=f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{fingerprint[:6]}")

    def advance(self, tokens: int) -> None:
        """One optimizer step of `tokens` tokens is done."""
        self.step += 1
        self.tokens_seen += tokens

    def to_meta(self) -> dict[str, Any]:
        """The fields as stored in meta.json."""
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainState:
        """Read back `to_meta()` output (older checkpoints kept val loss under 'val_loss')."""
        return cls(
            run_id=meta["run_id"],
            step=int(meta["step"]),
            tokens_seen=int(meta["tokens_seen"]),
            target_reached=bool(meta.get("target_reached", False)),
            last_val_loss=meta.get("last_val_loss", meta.get("val_loss")),
            extra_steps=int(meta.get("extra_steps", 0)),
            train_seconds=float(meta.get("train_seconds", 0.0)),
        )
