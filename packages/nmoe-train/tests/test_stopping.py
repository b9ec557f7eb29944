"""Stopping rules: a NaN/Inf loss or gradient (step, layer, last good checkpoint, no bad update); target_loss."""

import sqlite3
import tomllib

import pytest
import torch

from nmoe.train.config import build_config
from nmoe.train.loop import NonFiniteError, Trainer


def make_trainer(tmp_path, text_corpus, make_config, **sections) -> Trainer:
    raw = tomllib.loads(make_config(tmp_path, text_corpus, **sections))
    return Trainer(build_config(raw, "test", env={}), log=lambda s: None)


class Poison:
    """A Trainer hook that runs poison(model) right before optimizer step `before_step` (1-based) starts."""

    def __init__(self, before_step: int, poison):
        self.before_step, self.poison = before_step, poison

    def during_step(self, trainer, step):
        pass

    def after_save(self, trainer, step):
        if step + 1 == self.before_step:
            self.poison(trainer.model)


def poison_after_build(trainer: Trainer, step_to_poison: int, poison) -> None:
    trainer.hooks.append(Poison(step_to_poison, poison))


def test_nan_in_forward_names_step_layer_and_last_checkpoint(tmp_path, text_corpus, make_config):
    trainer = make_trainer(
        tmp_path, text_corpus, make_config, checkpoint={"dir": str(tmp_path / "ckpt"), "save_every": 2, "keep_last": 3}
    )

    def poison(model):
        with torch.no_grad():
            model.blocks[1].attn_norm.weight.fill_(float("nan"))

    poison_after_build(trainer, 3, poison)
    with pytest.raises(NonFiniteError) as e:
        trainer.run()
    msg = str(e.value)
    assert "non-finite loss at step 3" in msg
    assert "blocks.1" in msg, msg
    assert "step_00000002" in msg
    row = sqlite3.connect(tmp_path / "runs.sqlite").execute("SELECT status, last_step FROM runs").fetchone()
    assert row == ("failed", 2)


def test_inf_gradient_skips_the_update(tmp_path, text_corpus, make_config):
    trainer = make_trainer(tmp_path, text_corpus, make_config)
    snapshot = {}

    def poison(model):
        snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})

        # The forward stays finite; only the head's gradient becomes inf.
        def hook(grad):
            return grad * float("inf")

        model.head.weight.register_hook(hook)

    poison_after_build(trainer, 2, poison)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm at step 2") as e:
        trainer.run()
    assert "gradient of `head.weight` (forward was finite)" in str(e.value)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), snapshot[name]), f"{name} was updated by a non-finite step"


def test_target_loss_stops_the_run_at_the_first_eval_that_reaches_it(tmp_path, text_corpus, make_config):
    trainer = make_trainer(
        tmp_path, text_corpus, make_config, eval={"eval_every": 3, "eval_batches": 2, "target_loss": 50.0}
    )
    result = trainer.run()
    assert (result.status, result.step) == ("completed", 3)
    assert result.val_loss <= 50.0 and result.checkpoint.name == "step_00000003"
    # Rerunning the same command does not train past the target: the checkpoint remembers it was reached.
    logs = []
    again = Trainer(trainer.cfg, log=logs.append).run()
    assert (again.status, again.step, again.val_loss) == ("completed", 3, result.val_loss)
    assert again.losses == {} and any(
        "already finished at step 3" in line and "target val loss" in line for line in logs
    )
    assert ckpt_steps(tmp_path) == ["step_00000003"]


def ckpt_steps(tmp_path):
    return sorted(p.name for p in (tmp_path / "ckpt").rglob("step_*"))
