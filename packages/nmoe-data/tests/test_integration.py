"""Real text: the first documents of the corpus shipped in the repo (corpus/python-docs.jsonl.gz)."""

import gzip
import json
from itertools import islice

import numpy as np
import pytest

from nmoe.data import PrepOptions, Tokenizer, open_loader, prepare

MAX_DOCS = 200


@pytest.fixture(scope="module")
def corpus(h):
    return h.repo_corpus


def test_real_corpus_prep_round_trip_and_load(corpus, tmp_path, h):
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in islice(f, MAX_DOCS)]
    opts = PrepOptions(
        input=str(corpus),
        data_dir=str(tmp_path),
        name="docs",
        tokenizer=str(tmp_path / "tok.json"),
        tokenizer_vocab_size=2048,
        max_docs=MAX_DOCS,
        shard_tokens=100_000,
        val_fraction=0.05,
        workers=2,
    )
    m = prepare(opts, progress=False)
    tok = Tokenizer.load(tmp_path / "tok.json")
    assert m.vocab_size == 2048 and m.dtype == "uint16"
    decoded = []
    for split in ("train", "val"):
        stream = np.concatenate([np.load(m.dir / s.file) for s in m.splits[split].shards])
        decoded += [tok.decode(d) for d in h.split_documents(stream, m.bos_id)]
    assert sorted(decoded) == sorted(d for d in docs if d)
    chars = sum(map(len, docs))
    assert 2.5 < chars / m.total_tokens < 6  # a real BPE on English technical prose
    ld = open_loader(m.dir, seq_len=256, batch_size=8, expect_tokenizer_sha256=tok.sha256)
    inputs, targets = ld.next_batch()
    assert inputs.shape == (8, 256) and inputs.max() < 2048
    val = open_loader(m.dir, split="val", seq_len=256, batch_size=8).val_batches(max_batches=3)
    assert 1 <= len(val) <= 3
