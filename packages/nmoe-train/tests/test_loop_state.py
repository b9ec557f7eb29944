"""Trainer state that bitwise resume depends on: evaluation leaves the model untouched."""

import tomllib

import pytest
import torch

from nmoe.train.config import build_config
from nmoe.train.loop import Trainer


def built_trainer(tmp_path, text_corpus, make_config, prepared_data, **sections) -> Trainer:
    raw = tomllib.loads(make_config(tmp_path, text_corpus, data=prepared_data, **sections))
    return Trainer(build_config(raw, "test", env={}), log=lambda s: None)


def test_evaluate_leaves_every_buffer_unchanged(tmp_path, text_corpus, make_config, prepared_data):
    trainer = built_trainer(tmp_path, text_corpus, make_config, prepared_data)
    _, norm = trainer.train_step(1e-3)
    trainer.apply_update(norm)
    trainer.train_step(1e-3)  # router load counted since the last bias update, not yet applied
    before = {n: b.clone() for n, b in trainer.model.named_buffers()}
    assert any(n.endswith("load_since_update") and b.sum() > 0 for n, b in before.items())
    trainer.evaluate()
    after = dict(trainer.model.named_buffers())
    for name, value in before.items():
        assert torch.equal(after[name], value), f"evaluate() changed buffer {name}"
    assert trainer.model.training


def registry_rows(db):
    import sqlite3

    if not db.exists():
        return []
    return sqlite3.connect(db).execute("SELECT run_id, status FROM runs").fetchall()


def test_unwritable_output_fails_before_data_prep_naming_the_key(tmp_path, text_corpus, make_config):
    from nmoe.train.loop import SetupError

    (tmp_path / "a_file").write_text("")
    raw = tomllib.loads(make_config(tmp_path, text_corpus, checkpoint={"dir": str(tmp_path / "a_file" / "ckpt")}))
    with pytest.raises(
        SetupError, match=r"checkpoint.dir = '.*a_file/ckpt': cannot write to .*Point checkpoint.dir at a writable"
    ):
        Trainer(build_config(raw, "test", env={}), log=lambda s: None)
    assert not (tmp_path / "data").exists() and registry_rows(tmp_path / "runs.sqlite") == []


def test_metrics_writer_failure_marks_the_run_failed(tmp_path, text_corpus, make_config, prepared_data, monkeypatch):
    import nmoe.train.record as record

    def broken(*a, **k):
        raise RuntimeError("duckdb exploded")

    monkeypatch.setattr(record, "MetricsWriter", broken)
    raw = tomllib.loads(make_config(tmp_path, text_corpus, data=prepared_data))
    with pytest.raises(RuntimeError, match="duckdb exploded"):
        Trainer(build_config(raw, "test", env={}), log=lambda s: None).run()
    assert [status for _, status in registry_rows(tmp_path / "runs.sqlite")] == ["failed"]


def test_a_failed_save_names_the_last_good_checkpoint(tmp_path, text_corpus, make_config, prepared_data, monkeypatch):
    from nmoe.train import checkpoint as ckpt

    real = ckpt.publish

    def full_after_first(root, tmp, step, *a, **k):
        if step > 2:
            raise OSError(28, "No space left on device")
        return real(root, tmp, step, *a, **k)

    monkeypatch.setattr(ckpt, "publish", full_after_first)
    raw = tomllib.loads(
        make_config(
            tmp_path, text_corpus, data=prepared_data, checkpoint={"dir": str(tmp_path / "ckpt"), "save_every": 2}
        )
    )
    trainer = Trainer(build_config(raw, "test", env={}), log=lambda s: None)
    with pytest.raises(
        ckpt.CheckpointError, match=r"step 4 checkpoint .*No space left.*Last good checkpoint: .*step_00000002"
    ):
        trainer.run()
    assert [status for _, status in registry_rows(tmp_path / "runs.sqlite")] == ["failed"]


def test_resume_accepts_a_run_folder(tmp_path, text_corpus, make_config, prepared_data):
    raw = tomllib.loads(
        make_config(
            tmp_path,
            text_corpus,
            data=prepared_data,
            train={"steps": 4},
            optim={"lr": 3e-3, "warmup": 1, "warmdown": 2},
            runtime={"run_name": "first", "device": "cpu", "progress": False},
        )
    )
    Trainer(build_config(raw, "test", env={}), log=lambda s: None).run()
    raw["runtime"]["run_name"] = "second"
    raw["checkpoint"]["resume"] = str(tmp_path / "ckpt" / "first")
    logs = []
    result = Trainer(build_config(raw, "test", env={}), log=logs.append).run()
    assert any("resumed from" in line and "first/step_00000004" in line for line in logs)
    assert result.step == 4 and result.status == "completed"
