"""The NVIZ ASGI app: one HTML page, its script and Plotly from the installed wheel, and a JSON API."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from nmoe.metrics.nviz import data
from nmoe.metrics.nviz.data import DataError, Sources

STATIC_DIR = Path(__file__).with_name("static")
MAX_POINTS = 1000  # per series on a first load (a chart is ~500 px wide)
MAX_HEATMAP_STEPS = 200  # step windows of the expert-load heatmap on a first load


def plotly_js_path() -> Path:
    """plotly.min.js inside the installed `plotly` wheel (found without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "plotly.min.js is not in the installed plotly package (looked in plotly/package_data); "
        "reinstall it: uv sync --reinstall-package plotly"
    )


class StrictJSONResponse(JSONResponse):
    """JSON without NaN/Infinity literals (which browsers' JSON.parse rejects)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(data.json_safe(content), allow_nan=False, separators=(",", ":")).encode()


def create_app(src: Sources, *, poll_s: float = 3.0) -> Starlette:
    """The dashboard for `src`; the page polls the API every `poll_s` seconds for new points."""
    plotly_js = plotly_js_path()

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def plotly(request: Request) -> Response:
        return FileResponse(plotly_js, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    def status(request: Request) -> Response:
        return StrictJSONResponse(
            {
                "metrics_dir": str(src.metrics_dir),
                "registry": str(src.registry_db),
                "leaderboard": str(src.leaderboard),
                "poll_s": poll_s,
                "problems": data.source_problems(src),
                "thresholds": data.ROUTER_THRESHOLDS,
            }
        )

    def runs(request: Request) -> Response:
        return StrictJSONResponse(data.list_runs(src))

    def run(request: Request) -> Response:
        return StrictJSONResponse(data.run_detail(src, request.path_params["run_id"]))

    def series(request: Request) -> Response:
        query = request.query_params
        result = data.series(
            src,
            request.path_params["run_id"],
            prefixes=query.getlist("prefix"),
            tags=query.getlist("tag"),
            all_ranks=query.get("ranks", "lead") == "all",
            cursor=data.parse_cursor(query.get("cursor")),
            max_points=_int_param(query.get("max_points"), MAX_POINTS, "max_points"),
        )
        return StrictJSONResponse(result)

    def router(request: Request) -> Response:
        return StrictJSONResponse(data.router_latest(src, request.path_params["run_id"]))

    def expert_load(request: Request) -> Response:
        after = request.query_params.get("after")
        result = data.expert_load(
            src,
            request.path_params["run_id"],
            after=None if after in (None, "") else _int_param(after, 0, "after", minimum=-(2**62)),
            max_steps=_int_param(request.query_params.get("max_steps"), MAX_HEATMAP_STEPS, "max_steps"),
        )
        return StrictJSONResponse(result)

    def leaderboard(request: Request) -> Response:
        return StrictJSONResponse(data.leaderboard(src.leaderboard))

    async def data_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, DataError)
        return StrictJSONResponse({"error": exc.message}, status_code=exc.status)

    routes = [
        Route("/", index),
        Route("/static/plotly.min.js", plotly),
        Route("/api/status", status),
        Route("/api/runs", runs),
        Route("/api/runs/{run_id}", run),
        Route("/api/runs/{run_id}/series", series),
        Route("/api/runs/{run_id}/router", router),
        Route("/api/runs/{run_id}/expert_load", expert_load),
        Route("/api/leaderboard", leaderboard),
        Mount("/static", StaticFiles(directory=STATIC_DIR)),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(GZipMiddleware, minimum_size=2048)],
        exception_handlers={DataError: data_error},
    )


def _int_param(text: str | None, default: int, name: str, *, minimum: int = 1) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise DataError(f"query parameter {name}={text!r} must be an integer >= {minimum}", 400)
    return value
