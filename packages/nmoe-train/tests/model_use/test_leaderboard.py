"""LEADERBOARD.json: schema checks, atomic and concurrent appends, the sorted view, the trainer's entry helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from nmoe.train import leaderboard as lb
from nmoe.train.core_eval import CoreResult, TaskScore


def entry(**overrides) -> dict:
    base = {
        "run_id": "r1",
        "config": "super",
        "fingerprint": "ab" * 32,
        "git_rev": "0123456789ab",
        "gpu": "NVIDIA H100 80GB HBM3",
        "gpu_count": 1,
        "steps": 1000,
        "tokens": 524288000,
        "wall_clock_s": 1234.5,
        "val_loss": 3.28,
        "target_loss": 3.28,
        "target_reached": True,
        "core": {"score": 0.12, "n_tasks": 2, "tasks": {"copa": 0.2, "piqa": 0.04}},
        "date": "2026-11-24T08:00:00+00:00",
    }
    return {**base, **overrides}


def test_append_creates_then_extends_the_file(tmp_path):
    path = tmp_path / "LEADERBOARD.json"
    lb.append_entry(path, entry())
    lb.append_entry(path, entry(run_id="r2", core=None))
    doc = json.loads(path.read_text())
    assert doc["format"] == "nmoe.leaderboard/1"
    assert [e["run_id"] for e in doc["entries"]] == ["r1", "r2"] and doc["entries"][1]["core"] is None
    assert lb.load_leaderboard(path) == doc["entries"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LEADERBOARD.json", "LEADERBOARD.json.lock"]


@pytest.mark.parametrize(
    "bad, key",
    [
        (entry(gpu_count=-1), "gpu_count"),
        (entry(steps=1.5), "steps"),
        (entry(tokens=True), "tokens"),
        (entry(wall_clock_s=float("nan")), "wall_clock_s"),
        (entry(val_loss="3.2"), "val_loss"),
        (entry(target_reached=1), "target_reached"),
        (entry(run_id=""), "run_id"),
        (entry(date="yesterday"), "date"),
        (entry(core={"score": 0.1, "n_tasks": 3, "tasks": {"copa": 0.1}}), "core.tasks"),
        (entry(core={"score": 0.1, "n_tasks": 1}), "core"),
        (entry(core={"score": None, "n_tasks": 1, "tasks": {"copa": 0.1}}), "core.score"),
        (entry(core={"score": 0.1, "n_tasks": 1, "tasks": {"copa": "high"}}), "core.tasks.copa"),
        ({k: v for k, v in entry().items() if k != "git_rev"}, "missing ['git_rev']"),
        (entry(extra=1), "unexpected ['extra']"),
    ],
)
def test_schema_violations_are_refused_naming_the_key(tmp_path, bad, key):
    path = tmp_path / "LEADERBOARD.json"
    lb.append_entry(path, entry())
    before = path.read_bytes()
    with pytest.raises(lb.LeaderboardError, match=key.replace("[", r"\[").replace("]", r"\]")):
        lb.append_entry(path, bad)
    assert path.read_bytes() == before


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "LEADERBOARD.json"
    lb.append_entry(path, entry())
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(lb.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        lb.append_entry(path, entry(run_id="r2"))
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_foreign_or_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "LEADERBOARD.json"
    path.write_text('{"entries": []}')
    with pytest.raises(lb.LeaderboardError, match="not a leaderboard"):
        lb.append_entry(path, entry())
    path.write_text('{"format": "nmoe.leaderboard/1", "entries": [{"run_id": 3}]}')
    with pytest.raises(lb.LeaderboardError, match="entry 0"):
        lb.load_leaderboard(path)
    path.write_text("{")
    with pytest.raises(lb.LeaderboardError, match="not valid JSON"):
        lb.load_leaderboard(path)
    with pytest.raises(lb.LeaderboardError, match="no leaderboard at"):
        lb.load_leaderboard(tmp_path / "absent.json")


def test_concurrent_appenders_lose_no_entry(tmp_path):
    path = tmp_path / "LEADERBOARD.json"
    # the module alone (stdlib only), not the nmoe.train package (torch): four cheap interpreters
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("leaderboard", {lb.__file__!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        append_entry = module.append_entry
        e = {entry()!r}
        for i in range(8):
            append_entry({str(path)!r}, dict(e, run_id=f"{{sys.argv[1]}}-{{i}}"))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(w)], env=os.environ.copy()) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    ids = [e["run_id"] for e in lb.load_leaderboard(path)]
    assert sorted(ids) == sorted(f"{w}-{i}" for w in range(4) for i in range(8))


def test_view_sorts_reached_runs_by_time_then_the_rest_by_val_loss():
    entries = [
        entry(run_id="slow", wall_clock_s=3000.0),
        entry(run_id="missed-good", target_reached=False, val_loss=3.30, wall_clock_s=10.0),
        entry(run_id="fast", wall_clock_s=1800.0, core=None),
        entry(run_id="missed-bad", target_reached=False, val_loss=3.90, wall_clock_s=5.0),
    ]
    assert [e["run_id"] for e in lb.sorted_entries(entries)] == ["fast", "slow", "missed-good", "missed-bad"]
    lines = lb.format_leaderboard(entries).splitlines()
    assert lines[0].split()[:5] == ["#", "time", "target", "val", "loss"]
    assert lines[2].startswith("1  0:30:00") and lines[2].rstrip().endswith("fast")
    assert lines[3].startswith("2  0:50:00") and "0.1200 (2/22)" in lines[3]
    assert lines[4].startswith("-  (0:00:10)") and lines[5].rstrip().endswith("missed-bad")
    assert "(no entries)" in lb.format_leaderboard([])


def test_speedrun_entry_from_a_run(trained_run, tmp_path):
    _, trainer = trained_run
    core = CoreResult(0.25, 2, {"copa": TaskScore(0.6, 0.2, 100), "piqa": TaskScore(0.65, 0.3, 100)}, ["squad"])
    e = lb.speedrun_entry(
        trainer.cfg,
        run_id="run-7",
        git_rev="abc",
        gpu="cpu",
        gpu_count=0,
        steps=4,
        tokens=512,
        wall_clock_s=12.5,
        val_loss=5.5,
        target_reached=False,
        core_result=core,
    )
    assert e["config"] == "mla" and e["fingerprint"] == trainer.cfg.fingerprint and e["target_loss"] == 0.0
    assert e["core"] == {"score": 0.25, "n_tasks": 2, "tasks": {"copa": 0.2, "piqa": 0.3}}
    lb.append_entry(tmp_path / "LEADERBOARD.json", e)
    assert lb.load_leaderboard(tmp_path / "LEADERBOARD.json") == [e]


def test_cli_prints_the_table_or_one_error_line(tmp_path, capsys):
    path = tmp_path / "LEADERBOARD.json"
    lb.append_entry(path, entry())
    assert lb.main([str(path)]) == 0
    assert "super" in capsys.readouterr().out
    assert lb.main([str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nmoe-leaderboard: error: no leaderboard at") and err.count("\n") == 1
