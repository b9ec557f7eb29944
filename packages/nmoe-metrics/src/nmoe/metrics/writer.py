"""MetricsWriter: per-rank DuckDB metrics, written in batches by a background thread.

The writer opens the DuckDB file only while it appends a batch (connect, insert, close), so
other processes can open it read-only between flushes: that is how a live run is read.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path
from typing import Any

from nmoe.metrics._duckdb_lock import LOCK_TIMEOUT_S, open_duckdb

SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR, step BIGINT, tag VARCHAR, value DOUBLE, ts TIMESTAMP
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR, rank INTEGER, started TIMESTAMP, hostname VARCHAR, pid INTEGER, meta JSON
);
"""

# One statement per batch: the batch travels as four typed lists that DuckDB unnests column-wise.
INSERT_BATCH = """
INSERT INTO metrics
SELECT $run_id, unnest($steps::BIGINT[]), unnest($tags::VARCHAR[]), unnest($values::DOUBLE[]),
       make_timestamp(unnest($ts_us::BIGINT[]))
"""


def rank_path(metrics_dir: str | Path, run_id: str, rank: int) -> Path:
    """Path of one rank's metrics file: `{metrics_dir}/{run_id}/rank_{rank}.duckdb`."""
    return Path(metrics_dir) / run_id / f"rank_{rank}.duckdb"


def validate_run_id(run_id: str) -> None:
    """Raise ValueError unless `run_id` is a non-empty name usable as one directory."""
    if not isinstance(run_id, str) or not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id:
        raise ValueError(f"run_id must be a non-empty directory name without slashes, got {run_id!r}")


class MetricsWriter:
    """Append `(step, tag, value)` rows to `{metrics_dir}/{run_id}/rank_{rank}.duckdb` off the caller's thread.

    `log()` only queues; a daemon thread writes every `flush_every_s` seconds, or as soon as
    `max_buffer` values are queued. `flush()` blocks until everything logged so far is on disk.
    `resume_step`: when resuming from a checkpoint at that step, rows with a larger step (logged
    after the checkpoint by the interrupted process) are deleted so the history stays single-valued.
    """

    def __init__(
        self,
        metrics_dir: str | Path,
        run_id: str,
        rank: int = 0,
        *,
        flush_every_s: float = 2.0,
        max_buffer: int = 10000,
        meta: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
    ) -> None:
        validate_run_id(run_id)
        if not isinstance(rank, Integral) or rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        if not flush_every_s > 0:
            raise ValueError(f"flush_every_s must be > 0, got {flush_every_s!r}")
        if not isinstance(max_buffer, Integral) or max_buffer < 1:
            raise ValueError(f"max_buffer must be a positive int, got {max_buffer!r}")
        self.run_id = run_id
        self.rank = int(rank)
        self.path = rank_path(metrics_dir, run_id, self.rank)
        self._flush_every_s = float(flush_every_s)
        self._max_buffer = int(max_buffer)
        self._lock_timeout_s = float(lock_timeout_s)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_file(meta or {}, resume_step)

        self._queue: deque[tuple[int, int, list[tuple[str, float]]]] = deque()
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._queued_rows = 0  # rows in _queue, not yet taken by the thread
        self._logged_rows = 0  # rows ever logged
        self._written_rows = 0  # rows committed to disk
        self._error: BaseException | None = None  # fatal background error, re-raised to the caller
        self._lock_error: str | None = None  # last lock conflict, for flush() timeouts
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"nmoe-metrics-{run_id}-r{self.rank}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ caller side

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Queue one float per tag for `step` (never touches disk; NaN/inf are kept as they are)."""
        if self._closed:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed; create a new one to log more")
        self._raise_background_error()
        if not isinstance(step, Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")
        rows = [(_check_tag(tag), _to_float(tag, value)) for tag, value in values.items()]
        if not rows:
            return
        ts_us = time.time_ns() // 1000
        with self._cond:
            self._queue.append((int(step), ts_us, rows))
            self._queued_rows += len(rows)
            self._logged_rows += len(rows)
            backlog = self._queued_rows
        if backlog >= self._max_buffer:
            self._wake.set()

    def flush(self, timeout: float | None = None) -> None:
        """Block until every row logged before this call is committed; TimeoutError after `timeout` s."""
        with self._cond:
            target = self._logged_rows
        self._wake.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._written_rows < target and self._error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"flush of {self.path} timed out after {timeout}s with "
                        f"{target - self._written_rows} rows pending; last lock conflict: {self._lock_error}"
                    )
                if not self._thread.is_alive():
                    break
                self._cond.wait(0.1 if remaining is None else min(remaining, 0.1))
            unwritten = target - self._written_rows
        self._raise_background_error()
        if unwritten > 0:
            raise RuntimeError(f"MetricsWriter for {self.path} stopped with {unwritten} rows unwritten")

    def close(self, timeout: float | None = None) -> None:
        """Flush (TimeoutError after `timeout` s), stop the thread, unregister from atexit; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._stopping = True
            self._wake.set()
            self._thread.join()

    @property
    def pending_rows(self) -> int:
        """Rows logged but not yet committed to disk."""
        with self._cond:
            return self._logged_rows - self._written_rows

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _raise_background_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"metrics writer thread for {self.path} failed: {self._error!r}") from self._error

    # ------------------------------------------------------------------ disk side

    def _init_file(self, meta: Mapping[str, Any], resume_step: int | None) -> None:
        with open_duckdb(self.path, read_only=False, timeout_s=self._lock_timeout_s) as con:
            con.execute(SCHEMA)
            if resume_step is not None:
                con.execute("DELETE FROM metrics WHERE step > ?", [int(resume_step)])
            con.execute(
                "INSERT INTO runs VALUES (?, ?, make_timestamp(?), ?, ?, ?)",
                [
                    self.run_id,
                    self.rank,
                    time.time_ns() // 1000,
                    socket.gethostname(),
                    os.getpid(),
                    json.dumps(dict(meta)),
                ],
            )

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_every_s)
            self._wake.clear()
            with self._cond:
                stopping = self._stopping
            try:
                self._write_pending()
            except BaseException as exc:  # surfaced to the caller by log()/flush()/close()
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            if stopping:
                return

    def _write_pending(self) -> None:
        """Write everything queued; on a lock held too long, keep the batch queued and retry later."""
        with self._cond:
            batch = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
        if not batch:
            return
        try:
            n_rows = self._append(batch)
        except TimeoutError as exc:
            with self._cond:
                self._queue.extendleft(reversed(batch))
                self._queued_rows += sum(len(rows) for _, _, rows in batch)
                self._lock_error = str(exc)
            self._wake.set()  # retry at once; open_duckdb already waited
            return
        with self._cond:
            self._written_rows += n_rows
            self._cond.notify_all()

    def _append(self, batch: list[tuple[int, int, list[tuple[str, float]]]]) -> int:
        steps: list[int] = []
        tags: list[str] = []
        values: list[float] = []
        ts_us: list[int] = []
        for step, ts, rows in batch:
            for tag, value in rows:
                steps.append(step)
                tags.append(tag)
                values.append(value)
                ts_us.append(ts)
        with open_duckdb(self.path, read_only=False, timeout_s=self._lock_timeout_s) as con:
            con.execute(
                INSERT_BATCH, {"run_id": self.run_id, "steps": steps, "tags": tags, "values": values, "ts_us": ts_us}
            )
        return len(steps)


def _check_tag(tag: object) -> str:
    if not isinstance(tag, str) or not tag:
        raise TypeError(f"metric tags must be non-empty str, got {tag!r}")
    return tag


def _to_float(tag: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {tag!r}: value {value!r} is not convertible to float") from exc
