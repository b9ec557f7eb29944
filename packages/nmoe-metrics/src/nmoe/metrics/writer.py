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
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import duckdb

from nmoe.metrics._duckdb_lock import LOCK_TIMEOUT_S, open_duckdb

SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR, step BIGINT, tag VARCHAR, value DOUBLE, ts TIMESTAMP
);
CREATE TABLE IF NOT EXISTS arrays (
    run_id VARCHAR, step BIGINT, tag VARCHAR, value DOUBLE[], ts TIMESTAMP
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR, rank INTEGER, started TIMESTAMP, hostname VARCHAR, pid INTEGER, meta JSON
);
"""

# One statement per table and batch: the batch travels as four typed lists that DuckDB unnests column-wise.
INSERT_BATCH = """
INSERT INTO metrics
SELECT $run_id, unnest($steps::BIGINT[]), unnest($tags::VARCHAR[]), unnest($values::DOUBLE[]),
       make_timestamp(unnest($ts_us::BIGINT[]))
"""
INSERT_ARRAY_BATCH = """
INSERT INTO arrays
SELECT $run_id, unnest($steps::BIGINT[]), unnest($tags::VARCHAR[]), unnest($values::DOUBLE[][]),
       make_timestamp(unnest($ts_us::BIGINT[]))
"""

# A queued entry: (step, ts_us, scalar rows [(tag, value)], array rows [(tag, [values])]).
_Entry = tuple[int, int, list[tuple[str, float]], list[tuple[str, list[float]]]]


def rank_path(metrics_dir: str | Path, run_id: str, rank: int) -> Path:
    """Path of one rank's metrics file: `{metrics_dir}/{run_id}/rank_{rank}.duckdb`."""
    return Path(metrics_dir) / run_id / f"rank_{rank}.duckdb"


def validate_run_id(run_id: str) -> None:
    """Raise ValueError unless `run_id` is a non-empty name usable as one directory."""
    if not isinstance(run_id, str) or not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id:
        raise ValueError(f"run_id must be a non-empty directory name without slashes, got {run_id!r}")


class MetricsFileError(RuntimeError):
    """A rank's metrics file exists but cannot be opened as a DuckDB metrics file (damaged or foreign)."""


class MetricsWriter:
    """Append `(step, tag, value)` rows to `{metrics_dir}/{run_id}/rank_{rank}.duckdb` off the caller's thread.

    `log()` (scalars) and `log_array()` (one float vector per tag, e.g. per-expert load) only queue;
    a daemon thread writes every `flush_every_s` seconds, or as soon as `max_buffer` rows are queued,
    both tables in one transaction. `flush()` blocks until everything logged so far is on disk.
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

        self._queue: deque[_Entry] = deque()
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
        self._check_open(step)
        rows = [(_check_tag(tag), _to_float(tag, value)) for tag, value in values.items()]
        if rows:
            self._enqueue((int(step), time.time_ns() // 1000, rows, []))

    def log_array(self, step: int, tag: str, values: Sequence[float]) -> None:
        """Queue one vector of floats (e.g. E per-expert loads; pass `tensor.tolist()`) for `step` in table `arrays`."""
        self._check_open(step)
        _check_tag(tag)
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"array {tag!r}: values must be a sequence of floats, got {type(values).__name__}")
        floats = [_to_float(tag, v) for v in values]
        if not floats:
            raise ValueError(f"array {tag!r}: values is empty; log at least one float")
        self._enqueue((int(step), time.time_ns() // 1000, [], [(tag, floats)]))

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

    def _check_open(self, step: object) -> None:
        if self._closed:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed; create a new one to log more")
        self._raise_background_error()
        if not isinstance(step, Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")

    def _enqueue(self, entry: _Entry) -> None:
        n_rows = len(entry[2]) + len(entry[3])
        with self._cond:
            self._queue.append(entry)
            self._queued_rows += n_rows
            self._logged_rows += n_rows
            backlog = self._queued_rows
        if backlog >= self._max_buffer:
            self._wake.set()

    def _raise_background_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"metrics writer thread for {self.path} failed: {self._error!r}") from self._error

    # ------------------------------------------------------------------ disk side

    def _init_file(self, meta: Mapping[str, Any], resume_step: int | None) -> None:
        try:
            self._open_file(meta, resume_step)
        except duckdb.Error as err:  # a lock conflict is a TimeoutError, not this
            raise MetricsFileError(
                f"{self.path} cannot be opened as a metrics file ({str(err).splitlines()[0]})"
            ) from None

    def _open_file(self, meta: Mapping[str, Any], resume_step: int | None) -> None:
        with open_duckdb(self.path, read_only=False, timeout_s=self._lock_timeout_s) as con:
            con.execute(SCHEMA)
            if resume_step is not None:
                con.execute("DELETE FROM metrics WHERE step > ?", [int(resume_step)])
                con.execute("DELETE FROM arrays WHERE step > ?", [int(resume_step)])
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
                self._queued_rows += sum(len(rows) + len(arrays) for _, _, rows, arrays in batch)
                self._lock_error = str(exc)
            self._wake.set()  # retry at once; open_duckdb already waited
            return
        with self._cond:
            self._written_rows += n_rows
            self._cond.notify_all()

    def _append(self, batch: list[_Entry]) -> int:
        scalars = _columns((step, ts, rows) for step, ts, rows, _ in batch)
        arrays = _columns((step, ts, rows) for step, ts, _, rows in batch)
        with open_duckdb(self.path, read_only=False, timeout_s=self._lock_timeout_s) as con:
            con.begin()  # readers see a batch's scalars and arrays together or not at all
            for sql, columns in ((INSERT_BATCH, scalars), (INSERT_ARRAY_BATCH, arrays)):
                if columns["steps"]:
                    con.execute(sql, {"run_id": self.run_id, **columns})
            con.commit()
        return len(scalars["steps"]) + len(arrays["steps"])


def _columns(entries: Iterable[tuple[int, int, list[tuple[str, Any]]]]) -> dict[str, list]:
    """Row-wise `(step, ts_us, [(tag, value)])` entries as the column lists the INSERT statements unnest."""
    columns: dict[str, list] = {"steps": [], "tags": [], "values": [], "ts_us": []}
    for step, ts, rows in entries:
        for tag, value in rows:
            columns["steps"].append(step)
            columns["tags"].append(tag)
            columns["values"].append(value)
            columns["ts_us"].append(ts)
    return columns


def _check_tag(tag: object) -> str:
    if not isinstance(tag, str) or not tag:
        raise TypeError(f"metric tags must be non-empty str, got {tag!r}")
    return tag


def _to_float(tag: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {tag!r}: value {value!r} is not convertible to float") from exc
