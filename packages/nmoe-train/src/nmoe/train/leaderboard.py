"""LEADERBOARD.json: one entry per speedrun, appended atomically; a view sorted by time to target.

Schema (shared with the dashboard; `format` names its version):
  {"format": "nmoe.leaderboard/1", "entries": [{"run_id", "config", "fingerprint", "git_rev", "gpu",
   "gpu_count", "steps", "tokens", "wall_clock_s", "val_loss", "target_loss", "target_reached",
   "core": {"score", "n_tasks", "tasks": {name: centered_accuracy}} or null, "date"}]}
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT = "nmoe.leaderboard/1"
_NUMBER = (int, float)
# key -> (allowed types, check on the value or None, what it must be)
_FIELDS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "run_id": ((str,), bool, "a non-empty string"),
    "config": ((str,), bool, "a non-empty string (the config name)"),
    "fingerprint": ((str,), bool, "a non-empty string (Config.fingerprint)"),
    "git_rev": ((str,), bool, "a non-empty string"),
    "gpu": ((str,), bool, "a non-empty string (GPU kind, or 'cpu')"),
    "gpu_count": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "steps": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "tokens": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "wall_clock_s": (_NUMBER, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (seconds)"),
    "val_loss": (_NUMBER, math.isfinite, "a finite number"),
    "target_loss": (_NUMBER, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: no target)"),
    "target_reached": ((bool,), None, "true or false"),
    "core": ((dict, type(None)), None, "null or {score, n_tasks, tasks}"),
    "date": ((str,), lambda v: _is_iso_date(v), "an ISO 8601 date-time string"),
}


class LeaderboardError(ValueError):
    """A leaderboard file or entry does not follow the schema; the message names the key."""


def _is_iso_date(text: str) -> bool:
    try:
        dt.datetime.fromisoformat(text)
        return True
    except ValueError:
        return False


def validate_entry(entry: Mapping[str, Any]) -> None:
    """Raise LeaderboardError unless `entry` has exactly the schema's keys with valid values."""
    if not isinstance(entry, Mapping):
        raise LeaderboardError(f"a leaderboard entry must be an object, got {type(entry).__name__}")
    missing = [k for k in _FIELDS if k not in entry]
    extra = [k for k in entry if k not in _FIELDS]
    if missing or extra:
        raise LeaderboardError(f"leaderboard entry keys: missing {missing}, unexpected {extra}")
    for key, (types, check, what) in _FIELDS.items():
        value = entry[key]
        wrong_type = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if wrong_type or (check is not None and not check(value)):
            raise LeaderboardError(f"leaderboard entry `{key}` = {value!r}: must be {what}")
    if entry["core"] is not None:
        _validate_core(entry["core"])


def _validate_core(core: Mapping[str, Any]) -> None:
    if set(core) != {"score", "n_tasks", "tasks"}:
        raise LeaderboardError(f"leaderboard entry `core` must have exactly score, n_tasks, tasks; got {sorted(core)}")
    score, n_tasks, tasks = core["score"], core["n_tasks"], core["tasks"]
    if isinstance(score, bool) or not isinstance(score, _NUMBER) or not math.isfinite(score):
        raise LeaderboardError(f"leaderboard entry `core.score` = {score!r}: must be a finite number")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise LeaderboardError(f"leaderboard entry `core.n_tasks` = {n_tasks!r}: must be an integer >= 1")
    if not isinstance(tasks, Mapping) or len(tasks) != n_tasks:
        raise LeaderboardError(f"leaderboard entry `core.tasks` must map the {n_tasks} task names to centered accuracy")
    for name, value in tasks.items():
        if isinstance(value, bool) or not isinstance(value, _NUMBER) or not math.isfinite(value):
            raise LeaderboardError(f"leaderboard entry `core.tasks.{name}` = {value!r}: must be a finite number")


def load_leaderboard(path: str | Path) -> list[dict[str, Any]]:
    """The validated entries of a LEADERBOARD.json."""
    path = Path(path)
    if not path.is_file():
        raise LeaderboardError(f"no leaderboard at {path}; a speedrun with eval.leaderboard set writes one")
    return _read(path)


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LeaderboardError(f"{path} is not valid JSON ({e}); restore it from version control") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), list):
        raise LeaderboardError(f"{path} is not a leaderboard: expected {{'format': '{FORMAT}', 'entries': [...]}}")
    for i, entry in enumerate(doc["entries"]):
        try:
            validate_entry(entry)
        except LeaderboardError as e:
            raise LeaderboardError(f"{path} entry {i}: {e}") from None
    return doc["entries"]


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock on path's sidecar lock file (held across read-modify-write by every appender)."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_entry(path: str | Path, entry: Mapping[str, Any]) -> None:
    """Validate `entry` and append it: under a lock, to a temp file, fsync, rename over the leaderboard."""
    validate_entry(entry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        entries = _read(path) if path.exists() else []
        doc = {"format": FORMAT, "entries": [*entries, dict(entry)]}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(doc, indent=1, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def speedrun_entry(
    cfg,
    *,
    run_id: str,
    git_rev: str,
    gpu: str,
    gpu_count: int,
    steps: int,
    tokens: int,
    wall_clock_s: float,
    val_loss: float,
    target_reached: bool,
    core_result=None,
    date: str | None = None,
) -> dict[str, Any]:
    """A schema-valid leaderboard entry for a finished run of `cfg` (core_result: a CoreResult or None)."""
    core = None
    if core_result is not None:
        core = {
            "score": float(core_result.score),
            "n_tasks": int(core_result.n_tasks),
            "tasks": {name: float(s.centered) for name, s in core_result.tasks.items()},
        }
    entry = {
        "run_id": run_id,
        "config": cfg.name,
        "fingerprint": cfg.fingerprint,
        "git_rev": git_rev,
        "gpu": gpu,
        "gpu_count": int(gpu_count),
        "steps": int(steps),
        "tokens": int(tokens),
        "wall_clock_s": float(wall_clock_s),
        "val_loss": float(val_loss),
        "target_loss": float(cfg.eval.target_loss),
        "target_reached": bool(target_reached),
        "core": core,
        "date": date or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    validate_entry(entry)
    return entry


def detect_gpu() -> tuple[str, int]:
    """(GPU kind, visible count), or ('cpu', 0) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", 0
    return torch.cuda.get_device_name(0), torch.cuda.device_count()


def sorted_entries(entries: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Runs that reached their target by wall clock (fastest first), then the rest by val loss."""
    reached = sorted((e for e in entries if e["target_reached"]), key=lambda e: (e["wall_clock_s"], e["date"]))
    others = sorted((e for e in entries if not e["target_reached"]), key=lambda e: (e["val_loss"], e["wall_clock_s"]))
    return reached + others


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_leaderboard(entries: list[Mapping[str, Any]]) -> str:
    """Text table: rank, time to target, val loss / target, CORE, hardware, run."""
    header = ("#", "time", "target", "val loss", "CORE", "config", "gpu", "steps", "tokens", "git", "date", "run")
    rows = []
    for rank, e in enumerate(sorted_entries(entries), 1):
        core = e["core"]
        core_txt = f"{core['score']:.4f} ({core['n_tasks']}/22)" if core else "-"
        target_txt = f"{e['target_loss']:g}" if e["target_loss"] else "-"
        rows.append(
            (
                str(rank) if e["target_reached"] else "-",
                _clock(e["wall_clock_s"]) if e["target_reached"] else f"({_clock(e['wall_clock_s'])})",
                target_txt,
                f"{e['val_loss']:.4f}",
                core_txt,
                e["config"],
                f"{e['gpu_count']}x {e['gpu']}" if e["gpu_count"] else e["gpu"],
                f"{e['steps']:,}",
                f"{e['tokens']:,}",
                e["git_rev"],
                e["date"][:10],
                e["run_id"],
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(no entries)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nmoe-leaderboard",
        description="Speedrun leaderboard: runs that reached their target val loss, fastest first, then the rest "
        "(time in parentheses: the run's wall clock without reaching its target).",
    )
    p.add_argument("path", nargs="?", default="LEADERBOARD.json", help="leaderboard file (default: LEADERBOARD.json)")
    args = p.parse_args(argv)
    try:
        entries = load_leaderboard(args.path)
    except LeaderboardError as e:
        print(f"nmoe-leaderboard: error: {e}", file=sys.stderr)
        return 2
    print(format_leaderboard(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
