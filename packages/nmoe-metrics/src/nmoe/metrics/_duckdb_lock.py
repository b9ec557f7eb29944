"""Open DuckDB files that another process may hold: one writer *or* many readers at a time."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb

LOCK_TIMEOUT_S = 10.0


def is_lock_conflict(exc: BaseException) -> bool:
    """True when `exc` means another connection holds the file (retrying later will succeed)."""
    message = str(exc)
    return isinstance(exc, (duckdb.IOException, duckdb.ConnectionException)) and (
        "Could not set lock" in message or "different configuration" in message
    )


def connect_with_retry(
    path: str | Path, *, read_only: bool, timeout_s: float = LOCK_TIMEOUT_S
) -> duckdb.DuckDBPyConnection:
    """Connect to `path`, retrying with backoff while another process holds a conflicting lock."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            if not is_lock_conflict(exc):
                raise
            if time.monotonic() >= deadline:
                mode = "read-only" if read_only else "read-write"
                raise TimeoutError(
                    f"{path} stayed locked for {timeout_s:.1f}s while opening it {mode}: {exc}. "
                    "Readers of a live run must close their connection promptly (see nmoe-metrics README)."
                ) from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
