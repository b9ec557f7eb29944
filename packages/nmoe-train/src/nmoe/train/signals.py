"""SIGTERM / SIGINT become a flag the step loop reads between steps (checkpoint, then exit)."""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """Context manager: while active, SIGTERM/SIGINT set `.signal` instead of killing the process.

    A second SIGINT aborts at once (KeyboardInterrupt). Outside the main thread it installs nothing.
    """

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def name(self) -> str:
        """'SIGTERM' / 'SIGINT' (or '' when no signal arrived)."""
        return signal.Signals(self.signal).name if self.signal else ""
