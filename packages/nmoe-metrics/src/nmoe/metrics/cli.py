"""`nmoe-metrics`: list runs from the registry, show a run's latest metrics with sparklines, export CSV, serve NVIZ."""

from __future__ import annotations

import argparse
import csv
import math
import os
import sqlite3
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

from nmoe.metrics.reader import MetricRow, list_metric_runs, list_ranks, read_metrics
from nmoe.metrics.registry import Registry
from nmoe.metrics.sparkline import sparkline

DEFAULT_DB = "./runs/experiments.sqlite"
DEFAULT_METRICS_DIR = "./runs/metrics"
DEFAULT_LEADERBOARD = "./LEADERBOARD.json"
LOSS_KEYS = ("train/loss", "loss")
VAL_LOSS_KEYS = ("val/loss", "val_loss")


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `nmoe-metrics`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"nmoe-metrics: error: {exc}", file=sys.stderr)
        return 2
    except duckdb.Error as exc:  # the reader's messages name the file
        print(
            f"nmoe-metrics: error: cannot read the metrics file: {exc}\n"
            "  it is damaged or not an nmoe metrics file; move it out of the run's metrics directory",
            file=sys.stderr,
        )
        return 2
    except TimeoutError as exc:  # a live run's writer kept the file locked
        print(f"nmoe-metrics: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `nmoe-metrics show X | head`
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmoe-metrics", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    db_help = f"experiment registry (default: $NMOE_EXPERIMENTS_DB or {DEFAULT_DB})"
    dir_help = f"metrics root (default: $NMOE_METRICS_DIR or {DEFAULT_METRICS_DIR})"

    runs = sub.add_parser("runs", help="list runs in the experiment registry, newest first")
    runs.add_argument("--db", default=None, help=db_help)
    runs.add_argument("--limit", type=_positive_int, default=50, help="at most this many runs (default 50)")
    runs.set_defaults(func=cmd_runs)

    show = sub.add_parser("show", help="latest value and a sparkline of the whole history per tag")
    show.add_argument("run_id")
    show.add_argument("--metrics-dir", default=None, help=dir_help)
    show.add_argument("--db", default=None, help=db_help)
    show.add_argument("--rank", type=int, default=None, help="only this rank (default: every rank)")
    show.add_argument("--width", type=_positive_int, default=40, help="sparkline width in characters (default 40)")
    show.add_argument("--tag", action="append", default=None, help="only tags starting with this prefix (repeatable)")
    show.set_defaults(func=cmd_show)

    export = sub.add_parser("export", help="write every metric row of a run to CSV")
    export.add_argument("run_id")
    export.add_argument("--csv", required=True, type=Path, help="output file ('-' for stdout)")
    export.add_argument("--metrics-dir", default=None, help=dir_help)
    export.add_argument("--rank", type=int, default=None, help="only this rank (default: every rank)")
    export.set_defaults(func=cmd_export)

    serve = sub.add_parser("serve", help="NVIZ: the web dashboard of runs, charts, router health and the leaderboard")
    serve.add_argument("--metrics-dir", default=None, help=dir_help)
    serve.add_argument("--db", default=None, help=db_help)
    serve.add_argument(
        "--leaderboard", default=None, help=f"leaderboard JSON (default: $NMOE_LEADERBOARD or {DEFAULT_LEADERBOARD})"
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8050, help="port (default 8050; 0 picks a free one)")
    serve.add_argument("--poll-s", type=float, default=3.0, help="how often the page fetches new points (default 3)")
    serve.set_defaults(func=cmd_serve)
    return parser


# ---------------------------------------------------------------------- runs


def cmd_runs(args: argparse.Namespace) -> int:
    """Print the registry as a table: id, name, status, steps, device, start, final loss, val loss."""
    registry = _open_registry(args.db, must_exist=True)
    assert registry is not None
    runs = registry.list(limit=args.limit)
    if not runs:
        print(f"no runs in {registry.path}")
        return 0
    header = ("id", "name", "status", "steps", "device", "start", "final loss", "val loss")
    rows = [
        (
            run["run_id"],
            run["name"] or "-",
            run["status"],
            "-" if run["last_step"] is None else str(run["last_step"]),
            run["device"] or "-",
            _short_time(run["started_at"]),
            _metric_text(run["final_metrics"], LOSS_KEYS),
            _metric_text(run["final_metrics"], VAL_LOSS_KEYS),
        )
        for run in runs
    ]
    print(_table(header, rows, right_align={3, 6, 7}))
    return 0


# ---------------------------------------------------------------------- show


def cmd_show(args: argparse.Namespace) -> int:
    """Print the run's registry row (if any), then per tag: last step, latest, min, max and a sparkline."""
    metrics_dir = _metrics_dir(args.metrics_dir)
    registry = _open_registry(args.db, must_exist=False)
    run = _registry_row(registry, args.run_id)
    ranks = list_ranks(metrics_dir, args.run_id)
    if run is None and not ranks:
        raise CliError(_unknown_run_message(args.run_id, metrics_dir, registry))
    if run is not None:
        print(
            f"run {run['run_id']}  name {run['name'] or '-'}  status {run['status']}  "
            f"step {run['last_step'] if run['last_step'] is not None else '-'}  device {run['device'] or '-'}  "
            f"world {run['world_size']}  started {_short_time(run['started_at'])}"
        )
    if not ranks:
        print(f"no metrics recorded under {metrics_dir / args.run_id}")
        return 0
    if args.rank is not None and args.rank not in ranks:
        raise CliError(f"run {args.run_id!r} has no metrics for rank {args.rank}; ranks present: {ranks}")
    rows = read_metrics(metrics_dir, args.run_id, rank=args.rank)
    if args.tag:
        rows = [r for r in rows if any(r.tag.startswith(prefix) for prefix in args.tag)]
    if not rows:
        print(f"no metric rows yet in {metrics_dir / args.run_id}" + (f" matching {args.tag}" if args.tag else ""))
        return 0
    print(_series_table(rows, args.width))
    return 0


def _series_table(rows: list[MetricRow], width: int) -> str:
    series = _series_by_key(rows)
    multi_rank = len({rank for rank, _ in series}) > 1
    header = ("tag", "step", "latest", "min", "max", "history")
    lines = []
    for (rank, tag), points in sorted(series.items(), key=lambda item: (item[0][1], item[0][0])):
        values = [value for _, value in points]
        finite = [v for v in values if math.isfinite(v)]
        lines.append(
            (
                f"{tag} [rank {rank}]" if multi_rank else tag,
                str(points[-1][0]),
                _fmt(values[-1]),
                _fmt(min(finite)) if finite else "-",
                _fmt(max(finite)) if finite else "-",
                sparkline(values, width),
            )
        )
    return _table(header, lines, right_align={1, 2, 3, 4})


def _series_by_key(rows: list[MetricRow]) -> dict[tuple[int, str], list[tuple[int, float]]]:
    """(rank, tag) -> [(step, value)] by step; a step logged twice keeps its most recent value."""
    by_step: dict[tuple[int, str], dict[int, tuple[Any, float]]] = defaultdict(dict)
    for row in rows:
        slot = by_step[(row.rank, row.tag)]
        if row.step not in slot or row.ts >= slot[row.step][0]:
            slot[row.step] = (row.ts, row.value)
    return {key: [(step, v) for step, (_, v) in sorted(steps.items())] for key, steps in by_step.items()}


# ---------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    """Write `rank,step,tag,value,ts` rows (ts ISO 8601, UTC) to a CSV file or stdout."""
    metrics_dir = _metrics_dir(args.metrics_dir)
    if not list_ranks(metrics_dir, args.run_id):
        raise CliError(_unknown_run_message(args.run_id, metrics_dir, None))
    rows = read_metrics(metrics_dir, args.run_id, rank=args.rank)
    rows.sort(key=lambda r: (r.step, r.rank, r.tag, r.ts))
    try:
        out = sys.stdout if str(args.csv) == "-" else open(args.csv, "w", newline="")
    except OSError as exc:
        raise CliError(f"cannot write {args.csv}: {exc.strerror}; pass --csv with a writable path") from exc
    try:
        writer = csv.writer(out)
        writer.writerow(MetricRow._fields)
        writer.writerows((r.rank, r.step, r.tag, repr(r.value), r.ts.isoformat()) for r in rows)
    finally:
        if out is not sys.stdout:
            out.close()
    if out is not sys.stdout:
        print(f"wrote {len(rows)} rows to {args.csv}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the sources, bind the port, then serve NVIZ until Ctrl-C."""
    from nmoe.metrics.nviz.server import ServeError, serve

    leaderboard = Path(args.leaderboard or os.environ.get("NMOE_LEADERBOARD") or DEFAULT_LEADERBOARD)
    try:
        serve(
            _metrics_dir(args.metrics_dir),
            _registry_path(args.db),
            leaderboard,
            host=args.host,
            port=args.port,
            poll_s=args.poll_s,
            leaderboard_required=args.leaderboard is not None,
        )
    except ServeError as exc:
        raise CliError(str(exc)) from exc
    return 0


# ---------------------------------------------------------------------- helpers


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _registry_path(db: str | None) -> Path:
    return Path(db or os.environ.get("NMOE_EXPERIMENTS_DB") or DEFAULT_DB)


def _open_registry(db: str | None, *, must_exist: bool) -> Registry | None:
    path = _registry_path(db)
    if not path.exists():
        if must_exist:
            raise CliError(f"no experiment registry at {path}; pass --db PATH or set NMOE_EXPERIMENTS_DB")
        return None
    try:
        return Registry(path)
    except sqlite3.DatabaseError as exc:
        raise CliError(
            f"{path} is not a readable experiment registry ({exc}); "
            "pass --db with the right file or move this one aside"
        ) from exc


def _metrics_dir(metrics_dir: str | None) -> Path:
    return Path(metrics_dir or os.environ.get("NMOE_METRICS_DIR") or DEFAULT_METRICS_DIR)


def _registry_row(registry: Registry | None, run_id: str) -> dict[str, Any] | None:
    if registry is None:
        return None
    try:
        return registry.get(run_id)
    except KeyError:
        return None


def _unknown_run_message(run_id: str, metrics_dir: Path, registry: Registry | None) -> str:
    in_registry = [r["run_id"] for r in registry.list(limit=10)] if registry is not None else []
    in_metrics = list_metric_runs(metrics_dir)[:10]
    where = f"registry {registry.path}" if registry is not None else "no registry"
    return (
        f"unknown run id {run_id!r} (neither in the {where} nor under {metrics_dir}).\n"
        f"  recent runs in the registry: {', '.join(in_registry) or 'none'}\n"
        f"  runs with metrics: {', '.join(in_metrics) or 'none'}"
    )


def _metric_text(metrics: dict[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        if key in metrics and isinstance(metrics[key], (int, float)):
            return _fmt(float(metrics[key]))
    return "-"


def _short_time(iso: str | None) -> str:
    return "-" if not iso else iso.replace("T", " ")[:16]


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1e4:
        return f"{value:,.0f}"
    if magnitude >= 1e-3 or value == 0:
        return f"{value:.4f}"
    return f"{value:.3e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right_align: set[int]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right_align else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


if __name__ == "__main__":
    sys.exit(main())
