"""Fixtures for the model-use tools (CORE eval, sampling, export, leaderboard): a trained MLA checkpoint."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from nmoe.model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[4]
# ../shared beside the repo (a main checkout), or beside its parent (a worktree under the main one)
BUNDLE_CANDIDATES = [ROOT.parent / "shared" / "eval" / "core", ROOT.parent.parent / "shared" / "eval" / "core"]
SHARED_BUNDLE = next((p for p in BUNDLE_CANDIDATES if p.is_dir()), BUNDLE_CANDIDATES[0])

MLA_MODEL = dict(
    vocab_size=512,
    dim=32,
    n_layers=3,
    n_heads=4,
    max_seq_len=64,
    attn="mla",
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    inter_dim=64,
    n_dense_layers=1,
    n_routed_experts=8,
    n_shared_experts=1,
    moe_inter_dim=16,
    top_k=2,
    n_groups=2,
    topk_groups=1,
    route_scale=2.0,
)


def toml_text(sections: dict) -> str:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, text_corpus, prepared_data):
    """(checkpoint folder of a 4-step MLA MoE run, its Trainer) on the session's prepared corpus."""
    from nmoe.train.config import build_config
    from nmoe.train.loop import Trainer

    tmp = tmp_path_factory.mktemp("mla_run")
    sections = {
        "model": MLA_MODEL,
        "data": dict(
            name="synth",
            source="files",
            input=str(text_corpus),
            tokenizer_vocab_size=384,
            shard_tokens=4096,
            val_tokens=2048,
            **prepared_data,
        ),
        "train": dict(steps=4, seq_len=32, global_batch_size=4, seed=3, log_every=2),
        "optim": dict(lr=3e-3, warmup=1, warmdown=1),
        "checkpoint": dict(dir=str(tmp / "ckpt"), keep_last=2),
        "metrics": dict(dir=str(tmp / "metrics"), experiments_db=str(tmp / "runs.sqlite"), flush_every_s=0.1),
        "eval": dict(eval_batches=1),
        "runtime": dict(device="cpu", progress=False, run_name="mla"),
    }
    cfg = build_config(tomllib.loads(toml_text(sections)), "mla.toml", env={})
    trainer = Trainer(cfg, log=lambda s: None)
    result = trainer.run()
    assert result.status == "completed"
    return tmp / "ckpt" / "mla", trainer


def _random_model(seed: int = 0, scale: float = 5.0, **overrides) -> Transformer:
    """A tiny MLA MoE (MLA_MODEL + overrides) with weights `scale` times the init, in eval mode."""
    model = Transformer(ModelConfig(**{**MLA_MODEL, **overrides}))
    model.init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return model.eval()


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A 320-token byte-level BPE trained on a few sentences (enough for the CORE files' text)."""
    from nmoe.data import Tokenizer

    texts = [
        "Question: What is the answer? Answer: the answer is in the passage below.",
        "The country of citizenship of the person is France, Italy, Japan or Russia.",
        "Complete the rest of the sequence, making sure that the parentheses are closed properly.",
    ] * 20
    return Tokenizer.train(texts, 320)


@pytest.fixture
def random_model():
    """random_model(seed=0, scale=5.0, **model_overrides) -> a tiny MLA MoE Transformer in eval mode."""
    return _random_model


@pytest.fixture
def mla_model() -> dict:
    """The [model] keys of the tiny MLA MoE used by these tests."""
    return dict(MLA_MODEL)


@pytest.fixture
def core_bundle() -> Path:
    """The shared CORE bundle (../shared/eval/core beside the repo)."""
    if not SHARED_BUNDLE.is_dir():
        pytest.skip(f"CORE bundle not found at {SHARED_BUNDLE} (../shared beside the repo)")
    return SHARED_BUNDLE
