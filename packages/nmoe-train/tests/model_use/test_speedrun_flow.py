"""The speedrun flow through the one trainer: train to the target, CORE, one leaderboard entry (once)."""

from __future__ import annotations

import json
import tomllib

import pytest

from nmoe.metrics import latest
from nmoe.train.config import build_config
from nmoe.train.loop import Trainer

from .conftest import SHARED_BUNDLE


@pytest.mark.skipif(not SHARED_BUNDLE.is_dir(), reason=f"CORE task files not found at {SHARED_BUNDLE} (../shared)")
def test_target_then_core_then_one_leaderboard_entry(tmp_path, text_corpus, make_config, prepared_data):
    board = tmp_path / "LEADERBOARD.json"
    evals = {"eval_every": 2, "eval_batches": 1, "target_loss": 50.0, "core_bundle": str(SHARED_BUNDLE),
             "core_max_per_task": 2, "leaderboard": str(board)}  # fmt: skip
    raw = tomllib.loads(make_config(tmp_path, text_corpus, data=prepared_data, eval=evals))
    cfg = build_config(raw, "speedrun.toml", env={})
    result = Trainer(cfg, log=lambda s: None).run()
    assert (result.status, result.step) == ("completed", 2)  # the first evaluation already reaches 50 nats
    (entry,) = json.loads(board.read_text())["entries"]
    assert entry["target_reached"] is True and entry["steps"] == 2 and entry["tokens"] == 2 * 8 * 32
    assert entry["wall_clock_s"] > 0 and entry["core"]["n_tasks"] == 18 and entry["gpu"] == "cpu"
    assert entry["fingerprint"] == cfg.fingerprint and entry["val_loss"] == result.val_loss
    values = latest(tmp_path / "metrics", result.run_id)
    assert "core/score" in values and "core/arc_easy" in values
    again = Trainer(cfg, log=lambda s: None).run()  # a finished run: nothing trained, nothing appended
    assert again.losses == {} and len(json.loads(board.read_text())["entries"]) == 1


def test_a_missing_core_bundle_stops_the_run_before_training(tmp_path, text_corpus, make_config, prepared_data):
    from nmoe.train.runtime import SetupError

    raw = tomllib.loads(make_config(tmp_path, text_corpus, data=prepared_data,
                                    eval={"core_bundle": str(tmp_path / "no-bundle")}))  # fmt: skip
    with pytest.raises(
        SetupError, match=r"eval.core_bundle = '.*no-bundle': CORE bundle .* does not exist.*llm-foundry"
    ):
        Trainer(build_config(raw, "speedrun.toml", env={}), log=lambda s: None)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("step_*"))
