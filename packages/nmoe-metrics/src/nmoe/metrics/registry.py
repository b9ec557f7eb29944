"""Registry: the SQLite experiment registry, one row per run, safe to share between processes (WAL)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from numbers import Integral
from pathlib import Path
from typing import Any

FINAL_STATUSES = ("completed", "failed", "interrupted")
RUNNING = "running"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT,
    config_toml TEXT,
    fingerprint TEXT,
    git_rev TEXT,
    world_size INTEGER,
    device TEXT,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    status TEXT NOT NULL,
    last_step INTEGER,
    final_metrics_json TEXT NOT NULL DEFAULT '{}',
    updated_at TEXT NOT NULL
)
"""

_UPSERT_START = """
INSERT INTO runs (run_id, name, config_toml, fingerprint, git_rev, world_size, device,
                  started_at, ended_at, status, updated_at)
VALUES (:run_id, :name, :config_toml, :fingerprint, :git_rev, :world_size, :device,
        :now, NULL, 'running', :now)
ON CONFLICT(run_id) DO UPDATE SET
    name = excluded.name, config_toml = excluded.config_toml, fingerprint = excluded.fingerprint,
    git_rev = excluded.git_rev, world_size = excluded.world_size, device = excluded.device,
    ended_at = NULL, status = 'running', updated_at = excluded.updated_at
"""


def utc_now() -> str:
    """Current UTC time as ISO 8601 text with seconds, e.g. '2025-01-31T12:00:00+00:00'."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """One row per run in the SQLite file `experiments_db`: started, checkpointed and finished by the trainer.

    `final_metrics_json` holds the latest metrics reported by `checkpoint()` or `finish()`: each call
    merges its dict over the stored one, so a crashed run still shows its last checkpointed values.
    """

    def __init__(self, experiments_db: str | Path) -> None:
        self.path = Path(experiments_db)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(SCHEMA)

    def start(
        self,
        run_id: str,
        *,
        name: str,
        config_toml: str,
        fingerprint: str,
        git_rev: str | None,
        world_size: int,
        device: str,
    ) -> None:
        """Register `run_id` as running; on a resume (existing run_id) keep started_at, last_step and metrics."""
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty str, got {run_id!r}")
        if not isinstance(world_size, Integral) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        params = dict(
            run_id=run_id,
            name=name,
            config_toml=config_toml,
            fingerprint=fingerprint,
            git_rev=git_rev,
            world_size=int(world_size),
            device=device,
            now=utc_now(),
        )
        with self._transaction() as con:
            con.execute(_UPSERT_START, params)

    def checkpoint(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """Record that `run_id` reached `step` (int) and merge `metrics` (tag -> float) into its latest metrics."""
        with self._transaction() as con:
            merged = self._merged_metrics(con, run_id, metrics)
            con.execute(
                "UPDATE runs SET last_step = ?, final_metrics_json = ?, updated_at = ? WHERE run_id = ?",
                (int(step), merged, utc_now(), run_id),
            )

    def finish(self, run_id: str, status: str, final_metrics: Mapping[str, float], *, step: int | None = None) -> None:
        """End `run_id` with status 'completed', 'failed' or 'interrupted', merging `final_metrics` (and `step` if given)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"invalid final status {status!r}; valid statuses: {', '.join(FINAL_STATUSES)}")
        now = utc_now()
        with self._transaction() as con:
            merged = self._merged_metrics(con, run_id, final_metrics)
            con.execute(
                "UPDATE runs SET status = ?, ended_at = ?, final_metrics_json = ?, updated_at = ?,"
                " last_step = COALESCE(?, last_step) WHERE run_id = ?",
                (status, now, merged, now, None if step is None else int(step), run_id),
            )

    def get(self, run_id: str) -> dict[str, Any]:
        """The run's row as a dict of columns plus `final_metrics` (parsed); KeyError naming recent runs if absent."""
        with self._transaction() as con:
            row = con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(self._unknown_message(con, run_id))
        return _row_dict(row)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """Up to `limit` runs as dicts (see `get`), most recently started first."""
        with self._transaction() as con:
            rows = con.execute(
                "SELECT * FROM runs ORDER BY started_at DESC, rowid DESC LIMIT ?", (int(limit),)
            ).fetchall()
        return [_row_dict(row) for row in rows]

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30.0)
        con.row_factory = sqlite3.Row
        try:
            with con:  # commit on success, roll back on error
                yield con
        finally:
            con.close()

    def _merged_metrics(self, con: sqlite3.Connection, run_id: str, metrics: Mapping[str, float]) -> str:
        row = con.execute("SELECT final_metrics_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(self._unknown_message(con, run_id) + "; call Registry.start() first")
        merged = json.loads(row[0])
        merged.update({_check_key(k): _metric_value(k, v) for k, v in metrics.items()})
        return json.dumps(merged, sort_keys=True)

    @staticmethod
    def _unknown_message(con: sqlite3.Connection, run_id: str) -> str:
        recent = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY started_at DESC, rowid DESC LIMIT 10")]
        return f"run {run_id!r} is not in the registry; recent runs: {', '.join(recent) or 'none'}"


def _row_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["final_metrics"] = json.loads(out["final_metrics_json"])
    return out


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"metric names must be non-empty str, got {key!r}")
    return key


def _metric_value(key: str, value: object) -> float | int | str | None:
    """ints, str and None pass through; other numbers become float (NaN/inf kept, as JSON NaN/Infinity)."""
    if value is None or isinstance(value, (str, int)):
        return value
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {key!r}: value {value!r} is neither a number, a str nor None") from exc
