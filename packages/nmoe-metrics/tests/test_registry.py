import math
import sqlite3

import pytest

from nmoe.metrics import FINAL_STATUSES, Registry

START = dict(
    name="tiny", config_toml="[model]\ndim = 64\n", fingerprint="fp1", git_rev="abc123", world_size=1, device="cpu"
)


def test_lifecycle_start_checkpoint_finish(tmp_path):
    reg = Registry(tmp_path / "sub" / "experiments.sqlite")
    reg.start("run-1", **START)
    row = reg.get("run-1")
    assert row["status"] == "running" and row["ended_at"] is None and row["last_step"] is None
    assert row["config_toml"] == START["config_toml"] and row["world_size"] == 1 and row["final_metrics"] == {}

    reg.checkpoint("run-1", 100, {"train/loss": 3.5, "val/loss": 3.7})
    reg.checkpoint("run-1", 200, {"train/loss": 3.0})
    row = reg.get("run-1")
    assert row["status"] == "running" and row["last_step"] == 200
    assert row["final_metrics"] == {"train/loss": 3.0, "val/loss": 3.7}

    reg.finish("run-1", "completed", {"val/loss": 2.9, "tokens": 123}, step=250)
    row = reg.get("run-1")
    assert row["status"] == "completed" and row["ended_at"] is not None and row["last_step"] == 250
    assert row["final_metrics"] == {"train/loss": 3.0, "val/loss": 2.9, "tokens": 123}


def test_resume_sets_running_again_and_keeps_history(tmp_path):
    reg = Registry(tmp_path / "e.sqlite")
    reg.start("r", **START)
    reg.checkpoint("r", 50, {"train/loss": 4.0})
    first = reg.get("r")
    reg.finish("r", "interrupted", {})
    assert reg.get("r")["status"] == "interrupted"

    reg.start("r", **{**START, "git_rev": "def456"})
    row = reg.get("r")
    assert row["status"] == "running" and row["ended_at"] is None
    assert row["started_at"] == first["started_at"] and row["last_step"] == 50
    assert row["git_rev"] == "def456" and row["final_metrics"] == {"train/loss": 4.0}
    assert len(reg.list()) == 1


@pytest.mark.parametrize("status", FINAL_STATUSES)
def test_each_final_status_is_stored(tmp_path, status):
    reg = Registry(tmp_path / "e.sqlite")
    reg.start("r", **START)
    reg.finish("r", status, {"train/loss": math.nan})
    row = reg.get("r")
    assert row["status"] == status
    assert math.isnan(row["final_metrics"]["train/loss"])  # a diverged run stays visible


def test_invalid_status_lists_the_valid_ones(tmp_path):
    reg = Registry(tmp_path / "e.sqlite")
    reg.start("r", **START)
    with pytest.raises(ValueError, match="completed, failed, interrupted"):
        reg.finish("r", "done", {})
    assert reg.get("r")["status"] == "running"


def test_unknown_run_ids_fail_with_recent_runs(tmp_path):
    reg = Registry(tmp_path / "e.sqlite")
    reg.start("known", **START)
    with pytest.raises(KeyError, match="recent runs: known"):
        reg.get("nope")
    with pytest.raises(KeyError, match="Registry.start"):
        reg.checkpoint("nope", 1, {})
    with pytest.raises(KeyError):
        reg.finish("nope", "failed", {})
    with pytest.raises(TypeError, match="'loss'"):
        reg.checkpoint("known", 1, {"loss": object()})


def test_list_is_newest_first_and_limited(tmp_path):
    reg = Registry(tmp_path / "e.sqlite")
    for i in range(5):
        reg.start(f"r{i}", **START)
    assert [r["run_id"] for r in reg.list()] == ["r4", "r3", "r2", "r1", "r0"]
    assert [r["run_id"] for r in reg.list(limit=2)] == ["r4", "r3"]


def test_file_is_wal_and_shared_between_instances(tmp_path):
    path = tmp_path / "e.sqlite"
    Registry(path).start("r", **START)
    Registry(path).checkpoint("r", 7, {})
    assert Registry(path).get("r")["last_step"] == 7
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
