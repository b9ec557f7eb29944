"""Open DuckDB files that another process may hold: one writer *or* many readers at a time."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

LOCK_TIMEOUT_S = 10.0

_CONFLICT_TYPES = tuple(
    getattr(duckdb, name)
    for name in ("IOException", "ConnectionException", "ResourceInUseException")
    if hasattr(duckdb, name)
)
_CONFLICT_MESSAGES = ("Could not set lock", "different configuration", "file handle conflict", "already attached")

# DuckDB caches one database instance per file per process; opening one file from two threads at
# once (the writer thread and a reader in the trainer) races in that cache, so opens are serialised.
_path_locks: dict[str, threading.Lock] = {}
_path_locks_guard = threading.Lock()


def is_lock_conflict(exc: BaseException) -> bool:
    """True when `exc` means another connection holds the file (retrying later will succeed)."""
    message = str(exc)
    return isinstance(exc, _CONFLICT_TYPES) and any(m in message for m in _CONFLICT_MESSAGES)


@contextmanager
def open_duckdb(
    path: str | Path, *, read_only: bool, timeout_s: float = LOCK_TIMEOUT_S
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to `path` held only inside the `with` block; waits up to `timeout_s` for other holders."""
    key = os.path.realpath(path)
    with _path_locks_guard:
        in_process = _path_locks.setdefault(key, threading.Lock())
    if not in_process.acquire(timeout=timeout_s):
        raise TimeoutError(f"{path} stayed busy in this process for {timeout_s:.1f}s")
    try:
        con = _connect_with_retry(key, read_only=read_only, timeout_s=timeout_s)
        try:
            yield con
        finally:
            con.close()
    finally:
        in_process.release()


def _connect_with_retry(path: str, *, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return duckdb.connect(path, read_only=read_only)
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
