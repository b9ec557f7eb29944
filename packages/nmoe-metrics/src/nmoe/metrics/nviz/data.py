"""What the NVIZ pages show, read from the registry, the per-rank DuckDB files and the leaderboard.

Every DuckDB read is one short read-only open through `open_duckdb` (retried on a lock conflict), so a
run that is being written is read live and its writer is never held up for more than one query.
Problems with a file become `DataError`s whose message says which file and what to do.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from nmoe.metrics._duckdb_lock import open_duckdb
from nmoe.metrics.reader import has_table, list_metric_runs, list_ranks
from nmoe.metrics.writer import rank_path, validate_run_id

READ_TIMEOUT_S = 3.0  # a page request waits at most this long for a writer mid-flush
LIVE_WINDOW_S = 120.0  # a running run whose files changed this recently is "live"
LEADERBOARD_FORMAT = "nmoe.leaderboard/1"
EXPERT_LOAD_TAG = re.compile(r"^router/layer(\d+)/expert_load$")
LAYER_TAG = re.compile(r"^(router|precision)/layer(\d+)/(.+)$")

# The runbook's healthy ranges for the router, per layer (entropy in nats over all experts).
ROUTER_THRESHOLDS: dict[str, dict[str, Any]] = {
    "entropy_mean": {"op": ">", "value": 0.5, "label": "entropy mean > 0.5"},
    "max_gate_mean": {"op": "<", "value": 0.9, "label": "max gate mean < 0.9"},
    "collapse_frac": {"op": "<", "value": 1e-3, "label": "collapse ≈ 0"},
}
ROUTER_METRICS = ("entropy_mean", "max_gate_mean", "collapse_frac", "dropped_frac", "dropped_tokens", "load_cv")


class DataError(Exception):
    """A problem the page shows as it is: `message` names the file and the remedy; `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Sources:
    """Where NVIZ reads from: the metrics root, the SQLite registry and the leaderboard JSON."""

    metrics_dir: Path
    registry_db: Path
    leaderboard: Path


# ---------------------------------------------------------------------- files and checks


def read_duckdb(path: Path, sql: str, params: list | dict | None = None, *, table: str = "metrics") -> list[tuple]:
    """Rows of one read-only query on a rank file; [] when the file lacks `table`; DataError naming the file."""
    try:
        with open_duckdb(path, read_only=True, timeout_s=READ_TIMEOUT_S) as con:
            if not has_table(con, table):
                if table == "metrics":
                    raise DataError(damaged_duckdb_message(path, "it has no 'metrics' table"))
                return []
            return con.execute(sql, params or []).fetchall()
    except duckdb.Error as exc:
        raise DataError(damaged_duckdb_message(path, str(exc).splitlines()[0])) from exc
    except TimeoutError as exc:
        raise DataError(
            f"{path} is busy (its writer held it for {READ_TIMEOUT_S:.0f}s); the page retries", 503
        ) from exc
    except FileNotFoundError as exc:
        raise DataError(f"{path} disappeared while reading it", 404) from exc


def damaged_duckdb_message(path: Path, detail: str) -> str:
    """What the page and the CLI say about a rank file DuckDB cannot read."""
    return (
        f"cannot read {path}: {detail.rstrip('.! ')}. It is damaged or not an nmoe metrics file: "
        f"move it out of {path.parent}"
    )


def registry_rows(path: Path) -> list[dict[str, Any]]:
    """Every registry row as a dict (plus parsed `final_metrics`), newest first; [] when the file is absent.

    Opened read-only, so NVIZ never creates or changes a registry. DataError when the file is damaged."""
    if not path.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=READ_TIMEOUT_S)
        try:
            con.row_factory = sqlite3.Row
            rows = con.execute("SELECT * FROM runs ORDER BY started_at DESC, rowid DESC").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise DataError(
            f"the experiment registry {path} is not readable ({exc}); "
            "pass --db with the right file, or move this one aside (runs with metrics are still listed)"
        ) from exc
    out = []
    for row in rows:
        run = dict(row)
        try:
            run["final_metrics"] = json.loads(run.pop("final_metrics_json") or "{}")
        except json.JSONDecodeError:
            run["final_metrics"] = {}
        out.append(run)
    return out


def source_problems(src: Sources) -> list[str]:
    """Human-readable problems with the configured sources (empty when all is well)."""
    problems = []
    if not src.registry_db.exists():
        problems.append(f"no experiment registry at {src.registry_db} (pass --db or set NMOE_EXPERIMENTS_DB)")
    else:
        try:
            registry_rows(src.registry_db)
        except DataError as exc:
            problems.append(exc.message)
    if not src.metrics_dir.is_dir():
        problems.append(f"no metrics directory at {src.metrics_dir} (pass --metrics-dir or set NMOE_METRICS_DIR)")
    return problems


def _rank_files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + ".wal")]


def _last_write(src: Sources, run_id: str, ranks: list[int]) -> float | None:
    mtimes = [
        f.stat().st_mtime for r in ranks for f in _rank_files(rank_path(src.metrics_dir, run_id, r)) if f.exists()
    ]
    return max(mtimes) if mtimes else None


# ---------------------------------------------------------------------- runs list

_LIST_KEYS = {  # column -> registry final_metrics keys, then the metrics tag used while the run has none
    "train_loss": (("train/loss", "loss"), "train/loss"),
    "val_loss": (("val/loss", "val_loss"), "val/loss"),
    "tokens_per_s": (("tokens_per_s", "perf/tokens_per_s"), "perf/tokens_per_s"),
    "mfu": (("mfu", "perf/mfu"), "perf/mfu"),
    "target_reached": (("target_reached",), None),
}
_latest_cache: dict[tuple, dict[str, tuple[int, float]]] = {}


def list_runs(src: Sources) -> dict[str, Any]:
    """Every run of the registry and of the metrics directory: columns of the runs table, plus global problems."""
    problems: list[str] = []
    try:
        registered = registry_rows(src.registry_db)
    except DataError as exc:
        registered = []
        problems.append(exc.message)
    by_id = {row["run_id"]: row for row in registered}
    metric_runs = list_metric_runs(src.metrics_dir)
    runs = [
        _run_entry(src, by_id.get(run_id), run_id) for run_id in [*by_id, *(r for r in metric_runs if r not in by_id)]
    ]
    runs.sort(key=lambda r: r["started_at"] or "", reverse=True)
    return {"runs": runs, "problems": problems}


def _run_entry(src: Sources, row: dict[str, Any] | None, run_id: str) -> dict[str, Any]:
    row = row or {"run_id": run_id, "status": "unregistered", "final_metrics": {}}
    final = row.get("final_metrics", {})
    ranks = list_ranks(src.metrics_dir, run_id) if _safe_run_id(run_id) else []
    last_write = _last_write(src, run_id, ranks)
    device = row.get("device")
    world = row.get("world_size")
    entry: dict[str, Any] = {
        "run_id": run_id,
        "name": row.get("name"),
        "status": row["status"],
        "fingerprint": row.get("fingerprint"),
        "git_rev": row.get("git_rev"),
        "device": device,
        "world_size": world,
        "gpu_count": 0 if device is None or device.lower().startswith("cpu") else world,
        "started_at": row.get("started_at"),
        "ended_at": row.get("ended_at"),
        "steps": row["last_step"] if row.get("last_step") is not None else final.get("step"),
        "ranks": ranks,
        "last_write_age_s": None if last_write is None else max(0.0, time.time() - last_write),
        "error": None,
    }
    if entry["started_at"] is None and last_write is not None:
        entry["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(last_write))
    entry["live"] = row["status"] in ("running", "unregistered") and (
        entry["last_write_age_s"] is not None and entry["last_write_age_s"] < LIVE_WINDOW_S
    )
    for column, (keys, _) in _LIST_KEYS.items():
        entry[column] = next((final[k] for k in keys if final.get(k) is not None), None)
    missing = [c for c, (_, tag) in _LIST_KEYS.items() if tag and entry[c] is None]
    if ranks and (missing or entry["steps"] is None or entry["live"]):
        try:
            latest = _cached_latest(src, run_id, ranks[0])
        except DataError as exc:
            entry["error"] = exc.message
            entry["live"] = False
            return entry
        for column in missing + (["train_loss", "val_loss", "tokens_per_s", "mfu"] if entry["live"] else []):
            tag = _LIST_KEYS[column][1]
            if tag in latest:
                entry[column] = latest[tag][1]
        if latest and (entry["steps"] is None or entry["live"]):
            entry["steps"] = max(step for step, _ in latest.values())
    if isinstance(entry["target_reached"], (int, float)) and math.isfinite(entry["target_reached"]):
        entry["target_reached"] = bool(entry["target_reached"])
    return entry


def _safe_run_id(run_id: str) -> bool:
    try:
        validate_run_id(run_id)
    except ValueError:
        return False
    return True


def _cached_latest(src: Sources, run_id: str, rank: int) -> dict[str, tuple[int, float]]:
    """Latest (step, value) per tag of one rank file, re-read only when the file changed."""
    path = rank_path(src.metrics_dir, run_id, rank)
    key = (str(path), *((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in _rank_files(path)))
    if key not in _latest_cache:
        sql = "SELECT DISTINCT ON (tag) tag, step, value FROM metrics ORDER BY tag, step DESC, ts DESC"
        rows = read_duckdb(path, sql)
        if len(_latest_cache) > 1000:
            _latest_cache.clear()
        _latest_cache[key] = {tag: (step, value) for tag, step, value in rows}
    return _latest_cache[key]


# ---------------------------------------------------------------------- one run


def run_detail(src: Sources, run_id: str) -> dict[str, Any]:
    """Registry row (with config TOML), ranks, tags (of the lowest rank) and the layers with router/precision/expert-load data."""
    ranks = _known_ranks(src, run_id)
    row = next((r for r in _registry_or_empty(src) if r["run_id"] == run_id), None)
    tags: set[str] = set()
    array_tags: set[str] = set()
    if ranks:  # every rank logs the same tags: the lowest rank's file says which charts the run has
        path = rank_path(src.metrics_dir, run_id, ranks[0])
        tags.update(t for (t,) in read_duckdb(path, "SELECT DISTINCT tag FROM metrics"))
        array_tags.update(t for (t,) in read_duckdb(path, "SELECT DISTINCT tag FROM arrays", table="arrays"))
    layers: dict[str, set[int]] = defaultdict(set)
    for tag in tags:
        if m := LAYER_TAG.match(tag):
            layers[m.group(1)].add(int(m.group(2)))
    expert_layers = sorted(int(m.group(1)) for t in array_tags if (m := EXPERT_LOAD_TAG.match(t)))
    entry = _run_entry(src, row, run_id)
    return {
        **entry,
        "config_toml": (row or {}).get("config_toml"),
        "final_metrics": (row or {}).get("final_metrics", {}),
        "tags": sorted(tags),
        "array_tags": sorted(array_tags),
        "router_layers": sorted(layers["router"]),
        "precision_layers": sorted(layers["precision"]),
        "expert_load_layers": expert_layers,
    }


def _registry_or_empty(src: Sources) -> list[dict[str, Any]]:
    try:
        return registry_rows(src.registry_db)
    except DataError:
        return []  # the runs page reports it; a run page still shows the run's metrics


def _known_ranks(src: Sources, run_id: str) -> list[int]:
    if not _safe_run_id(run_id):
        raise DataError(f"{run_id!r} is not a run id", 404)
    ranks = list_ranks(src.metrics_dir, run_id)
    if ranks:
        return ranks
    if any(r["run_id"] == run_id for r in _registry_or_empty(src)):
        return []
    known = ", ".join(list_metric_runs(src.metrics_dir)[:10]) or "none"
    raise DataError(
        f"unknown run {run_id!r}: not in the registry {src.registry_db} and no metrics under "
        f"{src.metrics_dir / run_id}; runs with metrics: {known}",
        404,
    )


def parse_cursor(text: str | None) -> dict[int, int]:
    """`'0:120,1:118'` -> {0: 120, 1: 118} (rank -> last step the page has); {} for None or ''."""
    if not text:
        return {}
    try:
        return {int(r): int(s) for r, s in (part.split(":") for part in text.split(","))}
    except ValueError as exc:
        raise DataError(f"bad cursor {text!r}: expected 'rank:step,rank:step'", 400) from exc


# Parameters in order: the tag filter values, the cursor step, the point budget twice. A series with more
# points than the budget is cut into budget/2 buckets of equal step width; each keeps its min and max.
# Plain aggregates and a hash join: window functions cost several times more on big runs.
_SERIES_SQL = """
WITH dedup AS (
    SELECT tag, step, arg_max(value, ts) AS value FROM metrics
    WHERE ({where}) AND step >= ? GROUP BY tag, step
), span AS (
    SELECT tag, min(step) AS lo, max(step) AS hi, count(*) AS n FROM dedup GROUP BY tag
), keyed AS (
    SELECT d.tag, d.step, d.value, d.step = s.lo OR d.step = s.hi AS edge,
           CASE WHEN s.n <= ? THEN d.step ELSE (d.step - s.lo) * greatest(1, ? // 2) // (s.hi - s.lo + 1) END AS b
    FROM dedup d JOIN span s USING (tag)
), picked AS (
    SELECT tag, b, arg_min(step, value) AS step_min, arg_max(step, value) AS step_max FROM keyed GROUP BY tag, b
)
SELECT k.tag, list(k.step ORDER BY k.step), list(k.value ORDER BY k.step) FROM keyed k JOIN picked p USING (tag, b)
WHERE k.edge OR k.step = p.step_min OR k.step = p.step_max
GROUP BY k.tag ORDER BY k.tag
"""


def series(
    src: Sources,
    run_id: str,
    *,
    prefixes: list[str],
    tags: list[str],
    all_ranks: bool,
    cursor: dict[int, int],
    max_points: int,
) -> dict[str, Any]:
    """Scalar series per (tag, rank) with step >= the rank's cursor step.

    A first load (no cursor) keeps at most about `max_points` points per series: each bucket of
    consecutive steps keeps its minimum and maximum (a loss spike stays visible) and the last point is
    always kept. Non-finite values come back as null, listed in `nonfinite` as [step, 'nan'|'inf'|'-inf'].
    """
    ranks = _known_ranks(src, run_id)
    if not all_ranks:
        ranks = ranks[:1]
    clauses = ["starts_with(tag, ?)"] * len(prefixes) + ["tag = ?"] * len(tags)
    if not clauses:
        raise DataError("ask for at least one tag or prefix", 400)
    out: list[dict[str, Any]] = []
    new_cursor = {}
    for r in ranks:
        after = cursor.get(r, -(2**63))
        sql = _SERIES_SQL.format(where=" OR ".join(clauses))
        budget = max_points if r not in cursor else 2**62
        params = [*prefixes, *tags, after, budget, budget]
        rows = read_duckdb(rank_path(src.metrics_dir, run_id, r), sql, params)
        for tag, steps, values in rows:
            nonfinite = [[step, str(v)] for step, v in zip(steps, values) if not math.isfinite(v)]
            if nonfinite:
                values = [v if math.isfinite(v) else None for v in values]
            out.append({"tag": tag, "rank": r, "steps": steps, "values": values, "nonfinite": nonfinite})
        new_cursor[r] = max([after, *(steps[-1] for _, steps, _ in rows)])
    return {"series": out, "cursor": ",".join(f"{r}:{s}" for r, s in new_cursor.items() if s >= 0)}


def router_latest(src: Sources, run_id: str) -> dict[str, Any]:
    """Latest router metrics per layer (lowest rank) with each runbook check: {metric: {value, ok}}."""
    ranks = _known_ranks(src, run_id)
    if not ranks:
        return {"rank": None, "step": None, "layers": [], "thresholds": ROUTER_THRESHOLDS}
    latest = _cached_latest(src, run_id, ranks[0])
    layers: dict[int, dict[str, Any]] = defaultdict(dict)
    step = None
    for tag, (s, value) in latest.items():
        m = LAYER_TAG.match(tag)
        if not m or m.group(1) != "router" or m.group(3) not in ROUTER_METRICS:
            continue
        layers[int(m.group(2))][m.group(3)] = {"value": _json_float(value), "ok": _check(m.group(3), value)}
        step = s if step is None else max(step, s)
    return {
        "rank": ranks[0],
        "step": step,
        "layers": [{"layer": layer, **layers[layer]} for layer in sorted(layers)],
        "thresholds": ROUTER_THRESHOLDS,
    }


def _check(metric: str, value: float) -> bool | None:
    rule = ROUTER_THRESHOLDS.get(metric)
    if rule is None:
        return None
    if not math.isfinite(value):
        return False
    return value > rule["value"] if rule["op"] == ">" else value < rule["value"]


_EXPERT_LOAD_SQL = """
WITH b AS (
    SELECT tag, step // ? AS bucket, step, unnest(value) AS v, generate_subscripts(value, 1) AS e
    FROM arrays WHERE starts_with(tag, 'router/layer') AND ends_with(tag, '/expert_load') AND step > ?
), s AS (
    SELECT tag, bucket, max(step) AS step, e, sum(v) AS v FROM b GROUP BY tag, bucket, e
)
SELECT tag, max(step) AS step, list(v ORDER BY e) FROM s GROUP BY tag, bucket ORDER BY tag, step
"""


def expert_load(src: Sources, run_id: str, *, after: int | None, max_steps: int) -> dict[str, Any]:
    """Per-expert routed slots per layer and step, summed over ranks (steps every rank has logged).

    A first load (`after` None) sums consecutive logged steps into at most about `max_steps` windows of
    equal step width, labelled by the window's last step; the sum is the load over that window."""
    ranks = _known_ranks(src, run_id)
    lowest = -(2**63) if after is None else int(after)
    width = 1
    if after is None and ranks:
        bounds = [
            read_duckdb(
                rank_path(src.metrics_dir, run_id, r), "SELECT min(step), max(step) FROM arrays", table="arrays"
            )
            for r in ranks
        ]
        spans = [b[0] for b in bounds if b and b[0][0] is not None]
        if spans:
            first, last = min(s[0] for s in spans), max(s[1] for s in spans)
            width = max(1, math.ceil((last - first + 1) / max_steps))
    per_rank: list[dict[tuple[str, int], list[float]]] = []
    for r in ranks:
        rows = read_duckdb(rank_path(src.metrics_dir, run_id, r), _EXPERT_LOAD_SQL, [width, lowest], table="arrays")
        per_rank.append({(tag, step): values for tag, step, values in rows})
    layers: dict[int, dict[str, list]] = {}
    if per_rank:
        common = set(per_rank[0]).intersection(*per_rank[1:])
        for tag, step in sorted(common, key=lambda k: (k[0], k[1])):
            m = EXPERT_LOAD_TAG.match(tag)
            if not m:
                continue
            summed = [sum(vals) for vals in zip(*(rank_rows[(tag, step)] for rank_rows in per_rank))]
            layer = layers.setdefault(int(m.group(1)), {"steps": [], "load": []})
            layer["steps"].append(step)
            layer["load"].append([_json_float(v) for v in summed])
    last = max((layer["steps"][-1] for layer in layers.values()), default=after)
    return {
        "ranks": ranks,
        "window": width,
        "layers": [{"layer": k, **v} for k, v in sorted(layers.items())],
        "last_step": last,
    }


# ---------------------------------------------------------------------- leaderboard


def leaderboard(path: Path) -> dict[str, Any]:
    """Entries of the leaderboard JSON, fastest wall clock to target first; `message` when there is none."""
    if not path.exists():
        return {"path": str(path), "entries": [], "message": f"no leaderboard at {path} (pass --leaderboard PATH)"}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"the leaderboard {path} is not readable JSON ({exc}); fix or regenerate it") from exc
    if not isinstance(doc, dict) or doc.get("format") != LEADERBOARD_FORMAT or not isinstance(doc.get("entries"), list):
        raise DataError(
            f"the leaderboard {path} is not a {LEADERBOARD_FORMAT!r} document "
            '({"format": "nmoe.leaderboard/1", "entries": [...]}); fix or regenerate it'
        )
    entries = [e for e in doc["entries"] if isinstance(e, dict)]
    if len(entries) != len(doc["entries"]):
        raise DataError(f"the leaderboard {path} has entries that are not JSON objects; fix or regenerate it")

    def order(entry: dict[str, Any]) -> tuple:
        wall = entry.get("wall_clock_s")
        wall = wall if isinstance(wall, (int, float)) and math.isfinite(wall) else math.inf
        return (not entry.get("target_reached"), wall)

    return {"path": str(path), "entries": sorted(entries, key=order), "message": None}


# ---------------------------------------------------------------------- JSON


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by its text ('nan', 'inf', '-inf'), so strict JSON can carry it."""
    if isinstance(obj, float):
        return _json_float(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
