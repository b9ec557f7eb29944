"""Start NVIZ: check the sources up front (clear errors, no traceback), bind the port, run uvicorn."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from nmoe.metrics.nviz import data
from nmoe.metrics.nviz.app import create_app, plotly_js_path
from nmoe.metrics.nviz.data import DataError, Sources
from nmoe.metrics.reader import list_metric_runs, list_ranks
from nmoe.metrics.writer import rank_path


class ServeError(Exception):
    """NVIZ cannot start; the message says why and what to pass instead."""


def check_sources(src: Sources, *, leaderboard_required: bool) -> list[str]:
    """Raise ServeError for what makes the dashboard useless; return warnings (damaged rank files) otherwise."""
    if not src.registry_db.exists() and not src.metrics_dir.is_dir():
        raise ServeError(
            f"nothing to show: no experiment registry at {src.registry_db} and no metrics directory at "
            f"{src.metrics_dir}; pass --db and --metrics-dir (or set NMOE_EXPERIMENTS_DB / NMOE_METRICS_DIR)"
        )
    try:
        data.registry_rows(src.registry_db)
        if leaderboard_required and not src.leaderboard.exists():
            raise DataError(f"no leaderboard at {src.leaderboard}; pass --leaderboard with an existing file")
        data.leaderboard(src.leaderboard)
        plotly_js_path()
    except DataError as exc:
        raise ServeError(exc.message) from exc
    except FileNotFoundError as exc:
        raise ServeError(str(exc)) from exc
    warnings = []
    for run_id in list_metric_runs(src.metrics_dir):
        for r in list_ranks(src.metrics_dir, run_id):
            path = rank_path(src.metrics_dir, run_id, r)
            if not _has_duckdb_header(path):  # deeper damage shows on the run's page when it is read
                warnings.append(data.damaged_duckdb_message(path, "it does not start with a DuckDB header"))
    return warnings


def _has_duckdb_header(path: Path) -> bool:
    """Cheap check (no open, no lock): a DuckDB file carries the magic bytes 'DUCK' at offset 8."""
    try:
        with open(path, "rb") as f:
            return f.read(12)[8:12] == b"DUCK"
    except OSError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); ServeError naming the remedy when the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        raise ServeError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass --port with a free port (0 picks one)"
        ) from exc
    return sock


def serve(
    metrics_dir: Path,
    registry_db: Path,
    leaderboard: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8050,
    poll_s: float = 3.0,
    leaderboard_required: bool = False,
) -> None:
    """Serve NVIZ on host:port until interrupted; ServeError (before anything starts) when it cannot."""
    if not poll_s > 0:
        raise ServeError(f"--poll-s must be > 0, got {poll_s}")
    src = Sources(Path(metrics_dir), Path(registry_db), Path(leaderboard))
    for warning in check_sources(src, leaderboard_required=leaderboard_required):
        print(f"nmoe-metrics: warning: {warning}", file=sys.stderr)
    app = create_app(src, poll_s=poll_s)
    sock = bind(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    print(
        f"NVIZ on http://{shown_host}:{sock.getsockname()[1]}/  (Ctrl-C stops)\n"
        f"  metrics {src.metrics_dir}  registry {src.registry_db}  leaderboard {src.leaderboard}",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


@contextmanager
def running_server(app: Starlette, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `app` on a free port of `host` in a background thread; yields its base URL, stops on exit."""
    sock = bind(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the NVIZ test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
