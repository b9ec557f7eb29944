"""Read metrics of finished or live runs; every open is read-only, brief, and retried on a lock conflict."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import duckdb

from nmoe.metrics._duckdb_lock import LOCK_TIMEOUT_S, open_duckdb
from nmoe.metrics.writer import rank_path, validate_run_id

_RANK_FILE = re.compile(r"^rank_(\d+)\.duckdb$")


class MetricsReadError(duckdb.Error):
    """A metrics file could not be read; the message starts with its path (DuckDB's own may not name it)."""


class MetricRow(NamedTuple):
    """One stored value: `(rank, step, tag, value, ts)`; `ts` is naive UTC."""

    rank: int
    step: int
    tag: str
    value: float
    ts: datetime


class ArrayRow(NamedTuple):
    """One stored vector: `(rank, step, tag, values, ts)`; `values` is a list of floats, `ts` naive UTC."""

    rank: int
    step: int
    tag: str
    values: list[float]
    ts: datetime


def list_ranks(metrics_dir: str | Path, run_id: str) -> list[int]:
    """Ranks that have a metrics file for `run_id`, ascending (empty if the run has none)."""
    validate_run_id(run_id)
    run_dir = Path(metrics_dir) / run_id
    if not run_dir.is_dir():
        return []
    matches = (_RANK_FILE.match(p.name) for p in run_dir.iterdir())
    return sorted(int(m.group(1)) for m in matches if m)


def list_metric_runs(metrics_dir: str | Path) -> list[str]:
    """Run ids under `metrics_dir` that hold at least one rank file, most recently modified first."""
    root = Path(metrics_dir)
    if not root.is_dir():
        return []
    runs = [d for d in root.iterdir() if d.is_dir() and any(_RANK_FILE.match(p.name) for p in d.iterdir())]
    runs.sort(key=lambda d: max(p.stat().st_mtime for p in d.iterdir()), reverse=True)
    return [d.name for d in runs]


def read_metrics(
    metrics_dir: str | Path,
    run_id: str,
    tags: Iterable[str] | None = None,
    rank: int | None = None,
    *,
    timeout_s: float = LOCK_TIMEOUT_S,
) -> list[MetricRow]:
    """All rows of `run_id` (one `rank`, or every rank when None), filtered to `tags`, ordered by (tag, step, rank, ts)."""
    tag_list = None if tags is None else list(tags)
    rows: list[MetricRow] = []
    for r in _ranks_to_read(metrics_dir, run_id, rank):
        where, params = ("", []) if tag_list is None else ("WHERE list_contains(?::VARCHAR[], tag)", [tag_list])
        query = f"SELECT step, tag, value, ts FROM metrics {where}"
        rows.extend(MetricRow(r, *row) for row in _query(rank_path(metrics_dir, run_id, r), query, params, timeout_s))
    rows.sort(key=lambda row: (row.tag, row.step, row.rank, row.ts))
    return rows


def latest(
    metrics_dir: str | Path, run_id: str, rank: int | None = None, *, timeout_s: float = LOCK_TIMEOUT_S
) -> dict[str, tuple[int, float]]:
    """Latest `(step, value)` per tag; across ranks the largest step wins, ties go to the lowest rank."""
    best: dict[str, tuple[int, float]] = {}
    query = "SELECT DISTINCT ON (tag) tag, step, value FROM metrics ORDER BY tag, step DESC, ts DESC"
    for r in _ranks_to_read(metrics_dir, run_id, rank):
        for tag, step, value in _query(rank_path(metrics_dir, run_id, r), query, [], timeout_s):
            if tag not in best or step > best[tag][0]:
                best[tag] = (step, value)
    return dict(sorted(best.items()))


def read_arrays(
    metrics_dir: str | Path,
    run_id: str,
    tag_prefix: str = "",
    rank: int | None = None,
    *,
    after_step: int | None = None,
    timeout_s: float = LOCK_TIMEOUT_S,
) -> list[ArrayRow]:
    """Vectors logged by `MetricsWriter.log_array` whose tag starts with `tag_prefix` (and step > `after_step`),
    ordered by (tag, step, rank, ts); files written before the `arrays` table existed contribute none."""
    query = "SELECT step, tag, value, ts FROM arrays WHERE starts_with(tag, ?) AND step > ?"
    rows: list[ArrayRow] = []
    lowest = -(2**63) if after_step is None else int(after_step)
    for r in _ranks_to_read(metrics_dir, run_id, rank):
        path = rank_path(metrics_dir, run_id, r)
        with _naming(path), open_duckdb(path, read_only=True, timeout_s=timeout_s) as con:
            if not has_table(con, "arrays"):
                continue
            fetched = con.execute(query, [tag_prefix, lowest]).fetchall()
        rows.extend(ArrayRow(r, *row) for row in fetched)
    rows.sort(key=lambda row: (row.tag, row.step, row.rank, row.ts))
    return rows


def has_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """True when the open metrics file has `table` (older files lack `arrays`)."""
    found = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND schema_name = 'main'", [table])
    return found.fetchone()[0] > 0


def run_headers(metrics_dir: str | Path, run_id: str, *, timeout_s: float = LOCK_TIMEOUT_S) -> list[tuple]:
    """Rows of every rank's `runs` header table: `(run_id, rank, started, hostname, pid, meta_json)`, by start time."""
    rows: list[tuple] = []
    for r in _ranks_to_read(metrics_dir, run_id, None):
        rows.extend(_query(rank_path(metrics_dir, run_id, r), "SELECT * FROM runs", [], timeout_s))
    return sorted(rows, key=lambda row: (row[2], row[1]))


def _ranks_to_read(metrics_dir: str | Path, run_id: str, rank: int | None) -> list[int]:
    ranks = list_ranks(metrics_dir, run_id)
    if not ranks:
        known = ", ".join(list_metric_runs(metrics_dir)[:10]) or "none"
        raise FileNotFoundError(f"no metrics for run {run_id!r} under {metrics_dir}; runs there: {known}")
    if rank is None:
        return ranks
    if rank not in ranks:
        raise FileNotFoundError(f"run {run_id!r} has no metrics for rank {rank}; ranks present: {ranks}")
    return [rank]


def _query(path: Path, query: str, params: list, timeout_s: float) -> list[tuple]:
    with _naming(path), open_duckdb(path, read_only=True, timeout_s=timeout_s) as con:
        return con.execute(query, params).fetchall()


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise a DuckDB error of reading `path` as a MetricsReadError that names the file."""
    try:
        yield
    except MetricsReadError:
        raise
    except duckdb.Error as err:
        raise MetricsReadError(f"{path}: {str(err).splitlines()[0]}") from err
