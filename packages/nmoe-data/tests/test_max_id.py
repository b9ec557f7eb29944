"""Each shard's largest token id is in the manifest, so the loader refuses ids >= the model's vocab at open."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.data import DataError, Manifest, TokenizerMismatchError, open_loader
from nmoe.data.shards import ShardInfo, open_shard, scan_shard, sha256_file, write_shard

TRAIN, VAL, SHARD = 5003, 1201, 777  # train ids 0..5002 (last shard train_000006), val ids 1e6..


@pytest.fixture
def ds(tmp_path, h):
    return h.synthetic_dataset(tmp_path / "ds", TRAIN, VAL, shard_tokens=SHARD)


def _as_format_1(directory):
    """Rewrite a manifest as nmoe-data wrote it before max_id (format 1)."""
    doc = json.loads((directory / "manifest.json").read_text())
    doc["format"] = "nmoe.data.manifest/1"
    for split in doc["splits"].values():
        for shard in split["shards"]:
            del shard["max_id"]
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    (directory / "manifest.json").write_text(text)
    return text


@pytest.mark.parametrize("verify", [True, False])
def test_ids_at_or_above_the_vocab_limit_are_refused_at_open_naming_the_shard(ds, verify):
    with pytest.raises(
        TokenizerMismatchError,
        match=r"train_000006.npy holds token id 5002 .the largest of split .train..*only 5002 ids",
    ):
        open_loader(ds, seq_len=16, batch_size=2, verify=verify, vocab_limit=5002)
    with pytest.raises(TokenizerMismatchError, match=r"vocab size to at least 5003"):
        open_loader(ds, seq_len=16, batch_size=2, verify=verify, vocab_limit=100)
    open_loader(ds, seq_len=16, batch_size=2, verify=verify, vocab_limit=5003).next_batch()
    with pytest.raises(TokenizerMismatchError, match=r"val_000001.npy holds token id 1001200"):
        open_loader(ds, split="val", seq_len=16, batch_size=2, verify=verify, vocab_limit=1_001_200)


def test_the_check_reads_no_shard(ds, monkeypatch):
    import nmoe.data.shards as shards

    monkeypatch.setattr(shards, "sha256_file", lambda *a: pytest.fail("read a shard"))
    monkeypatch.setattr(shards, "scan_shard", lambda *a: pytest.fail("read a shard"))
    with pytest.raises(TokenizerMismatchError):
        open_loader(ds, seq_len=16, batch_size=2, verify=False, vocab_limit=10)


def test_format_1_manifest_is_read_unchanged_and_checked_when_verified(ds):
    text = _as_format_1(ds)
    m = Manifest.load(ds)
    assert m.format == "nmoe.data.manifest/1" and m.to_json() == text  # same sha256: resume states stay valid
    assert all(s.max_id is None for split in m.splits.values() for s in split.shards)
    with pytest.raises(TokenizerMismatchError, match=r"train_000006.npy holds token id 5002"):
        open_loader(ds, seq_len=16, batch_size=2, verify=True, vocab_limit=5002)
    open_loader(ds, seq_len=16, batch_size=2, verify=False, vocab_limit=5002)  # unchecked, as documented


def test_format_2_manifest_without_max_id_is_unreadable(ds):
    doc = json.loads((ds / "manifest.json").read_text())
    del doc["splits"]["train"]["shards"][0]["max_id"]
    (ds / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="unreadable.*re-run `nmoe-data prep`"):
        Manifest.load(ds)
    doc["format"] = "nmoe.data.manifest/9"
    (ds / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="manifest format 'nmoe.data.manifest/9'"):
        Manifest.load(ds)


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.integers(0, (1 << 32) - 1), min_size=0, max_size=300),
    wide=st.booleans(),
    chunk=st.integers(1, 700),
)
def test_scan_matches_sha256_and_max_for_any_block_size(tmp_path_factory, ids, wide, chunk):
    dtype = np.uint32 if wide else np.uint16
    tokens = np.array(ids, dtype=np.uint64).astype(dtype)
    directory = tmp_path_factory.mktemp("s")
    info = write_shard(directory, "train", 0, tokens)
    path = directory / info.file
    digest, max_id = scan_shard(path, np.load(path, mmap_mode="r"), chunk=chunk)
    assert digest == sha256_file(path) == info.sha256
    assert max_id == info.max_id == (int(tokens.max()) if tokens.size else -1)


def test_open_shard_returns_the_recorded_or_scanned_max_id(tmp_path):
    info = write_shard(tmp_path, "train", 0, np.array([3, 9, 4], dtype=np.uint16))
    assert open_shard(tmp_path, info, "uint16", verify=False)[1] == 9
    unknown = ShardInfo(info.file, info.tokens, info.bytes, info.sha256)
    assert open_shard(tmp_path, unknown, "uint16", verify=False)[1] is None
    assert open_shard(tmp_path, unknown, "uint16", verify=True)[1] == 9


def test_mixture_sources_are_each_checked(ds, tmp_path, h):
    small = h.synthetic_dataset(tmp_path / "small", 500, 100, shard_tokens=500, offset=0)
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[[dataset]]\npath = "{small}"\n[[dataset]]\npath = "{ds}"\n')
    open_loader(small, seq_len=16, batch_size=2, vocab_limit=500)
    with pytest.raises(TokenizerMismatchError, match=r"ds/train_000006.npy"):
        open_loader(mix, seq_len=16, batch_size=2, vocab_limit=500)
