"""NVIZ's JSON API and `nmoe-metrics serve`, against the DuckDB/SQLite fixtures of conftest.py."""

import gzip
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

from nmoe.metrics import MetricsWriter
from nmoe.metrics.cli import main
from nmoe.metrics.nviz.app import STATIC_DIR, create_app
from nmoe.metrics.nviz.data import Sources
from nmoe.metrics.nviz.server import running_server


def _get(url: str, *, headers: dict | None = None) -> tuple[int, dict | bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            status, body, kind = resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, body, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
    return status, json.loads(body) if kind.startswith("application/json") else body


@pytest.fixture(scope="module")
def server(nviz_sources):
    src = Sources(nviz_sources.metrics_dir, nviz_sources.registry_db, nviz_sources.leaderboard)
    with running_server(create_app(src, poll_s=0.5)) as url:
        yield url


def test_runs_list_merges_the_registry_and_the_metrics_dir(server):
    status, body = _get(f"{server}/api/runs")
    assert status == 200 and body["problems"] == []
    runs = {r["run_id"]: r for r in body["runs"]}
    assert {"tiny-done", "tiny-base", "crashed", "broken"} <= set(runs)
    done = runs["tiny-done"]
    assert (done["status"], done["name"], done["fingerprint"], done["git_rev"]) == (
        "completed",
        "tiny",
        "f1e2d3c4b5a69788",
        "0123456789abcdef0123",
    )
    assert (done["device"], done["gpu_count"], done["ranks"], done["steps"]) == ("NVIDIA H100 80GB HBM3", 2, [0, 1], 61)
    assert (done["val_loss"], done["tokens_per_s"], done["mfu"], done["target_reached"]) == (1.85, 50100.0, 0.31, True)
    assert done["live"] is False and done["error"] is None
    assert runs["tiny-base"]["target_reached"] is False
    # the registry lacks tokens/s and MFU for tiny-base: they come from its rank-0 file
    assert runs["tiny-base"]["tokens_per_s"] == 50060.0 and runs["tiny-base"]["mfu"] == 0.31
    crashed = runs["crashed"]
    assert crashed["train_loss"] == "nan" and crashed["gpu_count"] == 0 and crashed["ranks"] == []
    broken = runs["broken"]
    assert broken["status"] == "unregistered" and broken["live"] is False
    assert "rank_0.duckdb" in broken["error"] and "move it out" in broken["error"]


def test_run_detail_lists_tags_layers_and_config(server, nviz_helpers):
    layers = list(range(nviz_helpers.n_layers))
    status, run = _get(f"{server}/api/runs/tiny-done")
    assert status == 200
    assert run["router_layers"] == layers and run["precision_layers"] == layers and run["expert_load_layers"] == layers
    assert "train/loss" in run["tags"] and "router/mean/load_cv" in run["tags"]
    assert run["config_toml"].startswith("[model]") and run["final_metrics"]["target_reached"] == 1


def test_series_has_every_point_nan_as_null_and_per_rank_values(server):
    status, body = _get(f"{server}/api/runs/tiny-done/series?tag=train/loss")
    (loss,) = body["series"]
    assert status == 200 and loss["rank"] == 0 and loss["steps"] == list(range(1, 62))
    assert loss["values"][0] == pytest.approx(4.0 * math.exp(-1 / 25) + 1.5) and loss["values"][-1] is None
    assert loss["nonfinite"] == [[61, "nan"]] and body["cursor"] == "0:61"
    _, body = _get(f"{server}/api/runs/tiny-done/series?tag=perf/step_time_s&ranks=all")
    by_rank = {s["rank"]: s for s in body["series"]}
    assert by_rank[0]["values"] == [0.08] * 12 and by_rank[1]["values"] == pytest.approx([0.09] * 12)
    assert by_rank[1]["steps"] == list(range(5, 61, 5)) and body["cursor"] == "0:60,1:60"
    _, body = _get(f"{server}/api/runs/tiny-done/series?prefix=precision/layer01/")
    assert {s["tag"] for s in body["series"]} == {"precision/layer01/flip_frac", "precision/layer01/quant_err"}


def test_downsampling_keeps_spikes_and_the_last_point(nviz_sources, server):
    values = {step: 1.0 for step in range(1000)} | {537: 50.0, 800: -5.0}
    with MetricsWriter(nviz_sources.metrics_dir, "spiky") as w:
        for step, value in values.items():
            w.log(step, {"train/loss": value})
    _, body = _get(f"{server}/api/runs/spiky/series?tag=train/loss&max_points=20")
    (s,) = body["series"]
    assert len(s["steps"]) <= 22 and s["steps"] == sorted(s["steps"])
    assert {0, 537, 800, 999} <= set(s["steps"])
    assert all(v == values[step] for step, v in zip(s["steps"], s["values"]))


def test_cursor_polls_of_a_live_run_miss_nothing(server, live_run):
    _, first = _get(f"{server}/api/runs/{live_run.run_id}/series?tag=train/loss&tag=val/loss")
    seen = {s["tag"]: dict(zip(s["steps"], s["values"])) for s in first["series"]}
    cursor = first["cursor"]
    deadline = time.monotonic() + 20
    while max(seen["train/loss"]) < 45 and time.monotonic() < deadline:
        time.sleep(0.15)
        _, more = _get(f"{server}/api/runs/{live_run.run_id}/series?tag=train/loss&tag=val/loss&cursor={cursor}")
        last = int(cursor.split(":")[1])
        for s in more["series"]:
            assert min(s["steps"]) >= last, "a poll returned points before the cursor"
            seen.setdefault(s["tag"], {}).update(zip(s["steps"], s["values"]))
        cursor = more["cursor"]
    top = max(seen["train/loss"])
    assert top >= 45, f"the live run did not advance past step {top}"
    assert sorted(seen["train/loss"]) == list(range(1, top + 1))
    assert seen["train/loss"][7] == pytest.approx(4.0 * math.exp(-7 / 25) + 1.5)
    assert sorted(seen["val/loss"]) == list(range(20, top + 1, 20))


def test_router_latest_marks_runbook_breaches(server):
    status, body = _get(f"{server}/api/runs/tiny-done/router")
    assert status == 200 and body["rank"] == 0 and body["step"] == 60
    healthy, hot = body["layers"]
    assert healthy["layer"] == 0 and all(healthy[m]["ok"] for m in ("entropy_mean", "max_gate_mean", "collapse_frac"))
    assert hot["entropy_mean"] == {"value": pytest.approx(0.3), "ok": False}
    assert hot["max_gate_mean"] == {"value": pytest.approx(0.95), "ok": False}
    assert hot["collapse_frac"]["ok"] is True and hot["dropped_tokens"] == {"value": 3.0, "ok": None}
    assert body["thresholds"]["entropy_mean"]["value"] == 0.5 and body["thresholds"]["max_gate_mean"]["value"] == 0.9


def test_expert_load_sums_ranks_and_windows_without_losing_slots(server, nviz_helpers):
    expert_load = nviz_helpers.expert_load
    _, full = _get(f"{server}/api/runs/tiny-done/expert_load?max_steps=1000")
    assert full["window"] == 1 and full["ranks"] == [0, 1] and full["last_step"] == 60
    layer1 = full["layers"][1]
    assert layer1["layer"] == 1 and layer1["steps"] == list(range(5, 61, 5))
    assert layer1["load"][0] == [a + b for a, b in zip(expert_load(5, 1, 0), expert_load(5, 1, 1))]
    _, coarse = _get(f"{server}/api/runs/tiny-done/expert_load?max_steps=4")
    assert coarse["window"] == 14
    for fine, summed in zip(full["layers"], coarse["layers"]):
        assert len(summed["steps"]) <= 5 and summed["steps"][-1] == 60
        assert [sum(col) for col in zip(*summed["load"])] == [sum(col) for col in zip(*fine["load"])]
    _, newer = _get(f"{server}/api/runs/tiny-done/expert_load?after=50")
    assert [layer["steps"] for layer in newer["layers"]] == [[55, 60]] * nviz_helpers.n_layers
    assert len(newer["layers"][0]["load"][0]) == nviz_helpers.n_experts


def test_leaderboard_is_sorted_by_wall_clock_to_target(server):
    status, body = _get(f"{server}/api/leaderboard")
    assert status == 200 and body["message"] is None
    assert [e["run_id"] for e in body["entries"]] == ["tiny-done", "slow", "missed"]
    assert body["entries"][0]["core"]["tasks"] == {"arc_easy": 0.2, "piqa": 0.04}


@pytest.mark.parametrize(
    ("path", "status", "needle"),
    [
        ("/api/runs/nope", 404, "unknown run 'nope'"),
        ("/api/runs/broken", 500, "is damaged or not an nmoe metrics file"),
        ("/api/runs/broken/series?prefix=", 500, "rank_0.duckdb"),
        ("/api/runs/tiny-done/series?tag=train/loss&cursor=zero", 400, "bad cursor"),
        ("/api/runs/tiny-done/series?tag=train/loss&max_points=0", 400, "max_points"),
        ("/api/runs/tiny-done/series", 400, "at least one tag"),
    ],
)
def test_errors_are_json_messages(server, path, status, needle):
    got, body = _get(server + path)
    assert got == status and needle in body["error"]


def test_damaged_registry_and_leaderboard_are_reported_not_raised(nviz_sources, tmp_path):
    bad_db, bad_board = tmp_path / "bad.sqlite", tmp_path / "bad.json"
    bad_db.write_bytes(b"garbage" * 200)
    bad_board.write_text('{"format": "something else"}')
    src = Sources(nviz_sources.metrics_dir, bad_db, bad_board)
    with running_server(create_app(src)) as url:
        _, runs = _get(f"{url}/api/runs")
        _, status = _get(f"{url}/api/status")
        board_status, board = _get(f"{url}/api/leaderboard")
        _, detail = _get(f"{url}/api/runs/tiny-done")
    assert str(bad_db) in runs["problems"][0] and "pass --db" in runs["problems"][0]
    assert "tiny-done" in {r["run_id"] for r in runs["runs"]}  # the metrics dir is still listed
    assert status["problems"] == runs["problems"]
    assert board_status == 500 and "nmoe.leaderboard/1" in board["error"]
    assert detail["tags"] and detail["status"] == "unregistered"
    missing = Sources(nviz_sources.metrics_dir, bad_db, tmp_path / "none.json")
    with running_server(create_app(missing)) as url:
        _, board = _get(f"{url}/api/leaderboard")
    assert board["entries"] == [] and "no leaderboard at" in board["message"]


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def test_every_asset_is_local_and_plotly_comes_from_the_wheel(server):
    status, page = _get(f"{server}/")
    assert status == 200
    parser = _Assets()
    parser.feed(page.decode())
    assert parser.urls and all(u.startswith(("/", "#", "data:")) for u in parser.urls), parser.urls
    for path in ("/static/nviz.js", "/static/nviz.css"):
        status, body = _get(server + path)
        assert status == 200 and not re.search(rb"https?://", body), f"{path} refers to a remote URL"
    status, plotly = _get(f"{server}/static/plotly.min.js")
    assert status == 200 and len(plotly) > 1_000_000 and b"plotly.js" in plotly[:2000]
    request = urllib.request.Request(f"{server}/static/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.headers["content-encoding"] == "gzip"
        assert gzip.decompress(resp.read()) == plotly
    assert sorted(p.name for p in STATIC_DIR.iterdir()) == ["index.html", "nviz.css", "nviz.js"]


# ---------------------------------------------------------------------- the serve command


def _serve_args(src, *extra):
    return ["serve", "--metrics-dir", str(src.metrics_dir), "--db", str(src.registry_db), *extra]


def test_serve_refuses_damaged_or_missing_sources_with_exit_2(nviz_sources, tmp_path, capsys):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"garbage" * 200)
    assert main(["serve", "--db", str(bad), "--metrics-dir", str(nviz_sources.metrics_dir)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not readable" in err and "Traceback" not in err
    assert main(["serve", "--db", str(tmp_path / "no.sqlite"), "--metrics-dir", str(tmp_path / "no")]) == 2
    assert "nothing to show" in capsys.readouterr().err
    assert main(_serve_args(nviz_sources, "--leaderboard", str(tmp_path / "no.json"))) == 2
    assert "no leaderboard at" in capsys.readouterr().err
    assert main(_serve_args(nviz_sources, "--poll-s", "0")) == 2
    assert "--poll-s must be > 0" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(_serve_args(nviz_sources, "--leaderboard", str(nviz_sources.leaderboard), "--port", str(port))) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_command_serves_and_warns_about_damaged_rank_files(nviz_sources):
    exe = [sys.executable, "-m", "nmoe.metrics.cli"]
    args = _serve_args(nviz_sources, "--leaderboard", str(nviz_sources.leaderboard), "--port", "0")
    proc = subprocess.Popen([*exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://\S+?/", line)
        assert url, f"no URL in {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        status, body = _get(url.group(0) + "api/runs")
        assert status == 200 and "tiny-done" in {r["run_id"] for r in body["runs"]}
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "warning: cannot read" in err and "broken/rank_0.duckdb" in err and "DuckDB header" in err
    assert "Traceback" not in err
