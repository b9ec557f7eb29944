"""One runtime plan: the dry run and the trainer agree on device, precision and tokens per step; optimizer groups."""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path

import pytest
import torch

from nmoe.model import Transformer, model_summary
from nmoe.train.cli import dry_run
from nmoe.train.config import build_config, load_config
from nmoe.train.optim import param_groups
from nmoe.train.runtime import SetupError, plan_run

COMBOS = list(itertools.product(("auto", "cpu", "cuda"), ("auto", "bf16", "fp32"), (False, True), (1, 2, 4)))


ROOT = Path(__file__).resolve().parents[3]


def moonlet(device: str, dtype: str):
    """configs/moonlet.toml (real activation sizes) with the runtime and batch of one combination."""
    sets = {"runtime.device": device, "runtime.dtype": dtype, "train.global_batch_size": "8", "train.batch_size": "2"}
    return load_config(ROOT / "configs" / "moonlet.toml", env={}, overrides=sets)


@pytest.mark.parametrize("device,dtype,cuda,world", COMBOS)
def test_dry_run_reports_the_plan_the_trainer_runs(device, dtype, cuda, world):
    cfg = moonlet(device, dtype)
    if device == "cuda" and not cuda:
        with pytest.raises(SetupError, match="no CUDA GPU is visible"):
            plan_run(cfg, world, cuda_available=cuda)
        return
    plan = plan_run(cfg, world, cuda_available=cuda)
    expect_device = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    expect_bf16 = dtype == "bf16" or (dtype == "auto" and expect_device == "cuda")
    assert plan.device_type == expect_device
    assert plan.amp_dtype == (torch.bfloat16 if expect_bf16 else None)
    assert plan.act_bytes == (2 if expect_bf16 else 4)
    assert plan.tokens_per_step == 8 * cfg.train.seq_len and plan.grad_accum == 8 // (2 * world)
    text = dry_run(cfg, world_size=world, cuda_available=cuda)
    assert f"device       {expect_device}, {'bf16' if expect_bf16 else 'fp32'}" in text
    assert (
        f"tokens/step  {plan.tokens_per_step:,} (2 × {cfg.train.seq_len} × {plan.grad_accum} accum × {world} rank"
        in text
    )
    activations = model_summary(cfg.model, cfg.train.seq_len, 2, act_bytes=plan.act_bytes).activation_bytes
    shown = re.search(r"memory: activations +([0-9.]+) GiB", text).group(1)
    assert shown == f"{activations / 1024**3:.2f}" and float(shown) > 1  # bf16 and fp32 differ visibly


def test_the_trainer_uses_the_same_plan(tmp_path, text_corpus, make_config, prepared_data):
    from nmoe.train.loop import Trainer

    raw = tomllib.loads(make_config(tmp_path, text_corpus, data=prepared_data))
    cfg = build_config(raw, "test", env={})
    trainer = Trainer(cfg, log=lambda s: None)
    assert trainer.plan == plan_run(cfg, 1, cuda_available=torch.cuda.is_available())
    assert (
        trainer.summary.activation_bytes
        == model_summary(
            cfg.model, cfg.train.seq_len, trainer.plan.micro_batch, act_bytes=trainer.plan.act_bytes
        ).activation_bytes
    )
    trainer.lock.release()


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_embedding_and_head_decay_only_when_asked(tmp_path, text_corpus, make_config, decay_embeddings):
    raw = tomllib.loads(make_config(tmp_path, text_corpus, optim={"lr": 1e-3, "decay_embeddings": decay_embeddings}))
    cfg = build_config(raw, "test", env={})
    model = Transformer(cfg.model)
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    embed = groups["embeddings"]
    assert {id(p) for p in embed["params"]} == {id(model.tok_emb.weight), id(model.head.weight)}
    assert embed["weight_decay"] == (cfg.optim.weight_decay if decay_embeddings else 0.0)
    assert (
        groups["norms_biases"]["weight_decay"] == 0.0 and groups["matrices"]["weight_decay"] == cfg.optim.weight_decay
    )
    grouped = sorted(id(p) for g in groups.values() for p in g["params"])
    assert grouped == sorted(id(p) for p in model.parameters())  # every parameter in exactly one group
