"""Trainer state that bitwise resume depends on: evaluation leaves the model untouched."""

import tomllib

import torch

from nmoe.train.config import build_config
from nmoe.train.loop import Trainer


def built_trainer(tmp_path, text_corpus, make_config, prepared_data, **sections) -> Trainer:
    raw = tomllib.loads(make_config(tmp_path, text_corpus, data=prepared_data, **sections))
    trainer = Trainer(build_config(raw, "test", env={}), log=lambda s: None)
    trainer._build()
    return trainer


def test_evaluate_leaves_every_buffer_unchanged(tmp_path, text_corpus, make_config, prepared_data):
    trainer = built_trainer(tmp_path, text_corpus, make_config, prepared_data)
    _, norm = trainer.train_step(0)
    trainer._apply(norm)
    trainer.train_step(1)  # router load counted since the last bias update, not yet applied
    before = {n: b.clone() for n, b in trainer.model.named_buffers()}
    assert any(n.endswith("load_since_update") and b.sum() > 0 for n, b in before.items())
    trainer.evaluate()
    after = dict(trainer.model.named_buffers())
    for name, value in before.items():
        assert torch.equal(after[name], value), f"evaluate() changed buffer {name}"
    assert trainer.model.training
