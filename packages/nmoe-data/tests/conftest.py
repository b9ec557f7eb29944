"""Shared fixtures: small corpora in every input format, a small trained tokenizer, and
synthetic datasets whose token at stream position p is p (so windows identify themselves)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

# The hf code path must never touch the network in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

from nmoe.data import Manifest, SplitInfo, Tokenizer
from nmoe.data.shards import token_dtype, write_shard

REPO_ROOT = Path(__file__).resolve().parents[3]
REPO_CORPUS = REPO_ROOT / "corpus" / "python-docs.jsonl.gz"  # shipped in the repo: always present

WORDS = (
    "alpha beta gamma delta kernel scheduler memory page tensor expert router token "
    "byte merge shard loader resume epoch rank batch sequence vocabulary"
).split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Deterministic varied documents: words, numbers, punctuation, unicode, newlines."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(5, 120))).tolist()
        text = " ".join(words) + f". Item {i}: {int(rng.integers(0, 10**6))}!\n"
        if i % 5 == 0:
            text += "naïve café — 東京 🚀 tabs\tand  double  spaces\n\n"
        if i % 7 == 0:
            text += "a literal <|bos|> in the text stays text\n"
        docs.append(text)
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text", gz: bool = False) -> Path:
    lines = "".join(json.dumps({"id": i, field: d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    if gz:
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(lines.encode())
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=16)
    return path


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_docs(120)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(docs, 400).save(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer.load(tokenizer_path)


FAKE_TOKENIZER = {
    "kind": "hf",
    "vocab_size": 1 << 22,
    "bos_token": "<|bos|>",
    "bos_id": 0,
    "sha256": "f" * 64,
    "file": "tokenizer.json",
}


def synthetic_dataset(
    directory: Path,
    train_tokens: int,
    val_tokens: int,
    *,
    shard_tokens: int,
    offset: int = 0,
    tokenizer: dict = FAKE_TOKENIZER,
) -> Path:
    """A prepared dataset whose split stream holds offset, offset+1, ... (uint32)."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer["vocab_size"])
    splits = {}
    for split, n, base in (("train", train_tokens, offset), ("val", val_tokens, offset + 10**6)):
        stream = np.arange(base, base + n, dtype=dtype)
        shards = tuple(
            write_shard(directory, split, i, stream[s : s + shard_tokens])
            for i, s in enumerate(range(0, n, shard_tokens))
        )
        splits[split] = SplitInfo(n, 1, shards)
    Manifest(
        name=directory.name,
        source={"source": "synthetic"},
        tokenizer=tokenizer,
        vocab_size=tokenizer["vocab_size"],
        bos_id=0,
        dtype=dtype.name,
        shard_tokens=shard_tokens,
        splits=splits,
        prep_options={"synthetic": True, "offset": offset},
    ).save(directory)
    return directory


def split_documents(tokens: np.ndarray, bos_id: int) -> list[np.ndarray]:
    """Split a shard stream at bos tokens (each document starts with one)."""
    starts = np.flatnonzero(tokens == bos_id)
    assert starts.size == 0 or starts[0] == 0, "stream must start with bos"
    return [tokens[a + 1 : b] for a, b in zip(starts, list(starts[1:]) + [tokens.size])]


@pytest.fixture(scope="session")
def h():
    """Test helpers (conftest is not importable under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        make_docs=make_docs,
        write_jsonl=write_jsonl,
        write_parquet=write_parquet,
        synthetic_dataset=synthetic_dataset,
        split_documents=split_documents,
        repo_corpus=REPO_CORPUS,
        fake_tokenizer=FAKE_TOKENIZER,
    )
