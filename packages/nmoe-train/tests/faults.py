"""Fault injection for the trainer's tests, installed through Trainer hooks (never by the production loop).

Run as a script: `python faults.py CONFIG [--fault N:KILL|N:TERM|N:INT] [nmoe-train args...]` — the same
as `nmoe-train CONFIG ...` with the fault installed on every rank (or on --fault-rank R only).
KILL: SIGKILL right after step N's checkpoint (no cleanup at all). TERM / INT: the signal arrives
during step N (after its backward, before the ranks agree on the step).
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


def main(argv: list[str]) -> int:
    from nmoe.train.cli import main as cli_main

    hooks, rest, i = [], [], 0
    rank = None
    while i < len(argv):
        if argv[i] == "--fault":
            spec, i = argv[i + 1], i + 2
            hooks.append(spec)
        elif argv[i] == "--fault-rank":
            rank, i = int(argv[i + 1]), i + 2
        else:
            rest.append(argv[i])
            i += 1
    return cli_main(rest, hooks=[Fault(spec, rank) for spec in hooks])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
