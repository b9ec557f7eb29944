"""Test hooks for the trainer, installed through Trainer hooks (never by the production loop).

Run as a script (directly or under torchrun):
`python harness.py CONFIG [--fault N:KILL|N:TERM|N:INT] [--fault-rank R] [--dump-grads N:DIR] [nmoe-train args]`
— the same as `nmoe-train CONFIG ...` with the hooks installed on every rank (a fault on --fault-rank R only).
KILL: SIGKILL right after step N's checkpoint (no cleanup at all). TERM / INT: the signal arrives
during step N (after its backward, before the ranks agree on the step). --dump-grads: after step N's
gradient reductions, each rank saves {name: grad} and its global expert range to DIR/rank{R}.pt.
"""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}


class Fault:
    """A Trainer hook that sends `kind` to this process at `step`."""

    def __init__(self, spec: str, rank: int | None = None):
        at, _, kind = spec.partition(":")
        self.step, self.kind, self.rank = int(at), kind.upper(), rank

    def _mine(self, step: int) -> bool:
        return step == self.step and (self.rank is None or self.rank == int(os.environ.get("RANK", "0")))

    def during_step(self, trainer, step: int) -> None:
        if self.kind != "KILL" and self._mine(step):
            os.kill(os.getpid(), SIGNALS[self.kind])

    def after_save(self, trainer, step: int) -> None:
        if self.kind == "KILL" and self._mine(step):
            os.kill(os.getpid(), signal.SIGKILL)


class GradDump:
    """A Trainer hook that saves this rank's reduced gradients at one step."""

    def __init__(self, spec: str):
        at, _, folder = spec.partition(":")
        self.step, self.folder = int(at), folder

    def during_step(self, trainer, step: int) -> None:
        if step != self.step:
            return
        import torch

        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        experts = sorted(n for n in grads if trainer.shard.is_expert(n))
        payload = {"grads": grads, "experts": trainer.shard.expert_range, "expert_names": experts}
        torch.save(payload, os.path.join(self.folder, f"rank{trainer.world.rank}.pt"))

    def after_save(self, trainer, step: int) -> None:
        pass


def main(argv: list[str]) -> int:
    from nmoe.train.cli import main as cli_main

    faults, dumps, rest, i = [], [], [], 0
    rank = None
    while i < len(argv):
        if argv[i] == "--fault":
            faults.append(argv[i + 1])
            i += 2
        elif argv[i] == "--fault-rank":
            rank, i = int(argv[i + 1]), i + 2
        elif argv[i] == "--dump-grads":
            dumps.append(GradDump(argv[i + 1]))
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return cli_main(rest, hooks=[*dumps, *(Fault(spec, rank) for spec in faults)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
