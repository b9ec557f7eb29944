import json
import random
from pathlib import Path

import pytest

WORDS = (
    "expert router token gradient shard layer norm attention kernel tensor batch loss "
    "the a of to and in is for on with as by it be this that from which are"
).split()


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A small deterministic jsonl corpus (~60k words) for end-to-end runs."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w") as f:
        for i in range(400):
            words = [rng.choice(WORDS) for _ in range(rng.randint(60, 240))]
            f.write(json.dumps({"id": i, "text": " ".join(words) + "."}) + "\n")
    return root / "docs.jsonl"


def tiny_config(tmp: Path, corpus: Path, **sections) -> str:
    """TOML text of a very small MoE run rooted in tmp (data, checkpoints, metrics)."""
    base = {
        "model": dict(
            vocab_size=512,
            dim=32,
            n_layers=2,
            n_heads=2,
            head_dim=16,
            inter_dim=64,
            n_dense_layers=1,
            n_routed_experts=4,
            n_shared_experts=1,
            moe_inter_dim=16,
            top_k=2,
            max_seq_len=64,
            attn="sdpa",
            attn_local="swa",
            attn_global_every=2,
            attn_local_window=8,
        ),
        "data": dict(
            name="synth",
            source="files",
            input=str(corpus),
            tokenizer=str(tmp / "tok.json"),
            tokenizer_vocab_size=384,
            shard_tokens=4096,
            val_tokens=2048,
            data_dir=str(tmp / "data"),
        ),
        "train": dict(steps=8, seq_len=32, global_batch_size=8, batch_size=4, seed=7, log_every=2),
        "optim": dict(lr=3e-3, warmup=2, warmdown=3),
        "checkpoint": dict(dir=str(tmp / "ckpt"), save_every=4, keep_last=5),
        "metrics": dict(dir=str(tmp / "metrics"), experiments_db=str(tmp / "runs.sqlite"), flush_every_s=0.1),
        "eval": dict(eval_every=4, eval_batches=2),
        "runtime": dict(device="cpu", progress=False),
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def make_config():
    """tiny_config(tmp, corpus, **section_overrides) -> TOML text."""
    return tiny_config


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, text_corpus) -> dict:
    """[data] overrides pointing at one prepared copy of text_corpus shared by the session's tests."""
    import tomllib

    from nmoe.train.config import build_config
    from nmoe.train.data_setup import ensure_data

    root = tmp_path_factory.mktemp("prepared")
    data = {"data_dir": str(root / "data"), "tokenizer": str(root / "tok.json")}
    ensure_data(
        build_config(tomllib.loads(tiny_config(root, text_corpus, data=data)), "prep", env={}), log=lambda s: None
    )
    return data
