import json
import shlex

import numpy as np
import pytest

import nmoe.data.prep as prep_mod
from nmoe.data import DataError, PrepOptions, SourceUnavailableError, dataset_dir, is_prepared, prep_command, prepare
from nmoe.data.cli import _parser, _prep_options


def _opts(tmp_path, tokenizer_path, input, **kw):
    kw = {"name": "ds", "shard_tokens": 700, "val_fraction": 0.2, "workers": 1, **kw}
    if kw.get("source") == "hf":
        kw.setdefault("dataset", str(input))
    else:
        kw.setdefault("input", str(input))
    return PrepOptions(data_dir=str(tmp_path / "out"), tokenizer=str(tokenizer_path), **kw)


def _stream(manifest, split):
    shards = [np.load(manifest.dir / s.file) for s in manifest.splits[split].shards]
    return np.concatenate(shards) if shards else np.zeros(0, dtype=manifest.dtype)


def _check_round_trip(manifest, tokenizer, docs, h):
    """Every non-empty source document comes back, in order within its split."""
    seen = []
    for split in ("train", "val"):
        decoded = [tokenizer.decode(d) for d in h.split_documents(_stream(manifest, split), manifest.bos_id)]
        indices = [docs.index(d) for d in decoded]
        assert indices == sorted(indices), f"{split} documents out of order"
        assert manifest.splits[split].documents == len(decoded)
        assert manifest.splits[split].tokens == _stream(manifest, split).size
        seen += indices
    assert sorted(seen) == [i for i, d in enumerate(docs) if d]


def _write_inputs(kind, directory, docs, h):
    directory.mkdir()
    if kind == "txt":
        for i, d in enumerate(docs):
            (directory / f"doc_{i:04d}.txt").write_text(d, encoding="utf-8")
        return directory / "*.txt"
    half = len(docs) // 2
    if kind == "mixed":  # sorted names: a.jsonl, b.parquet, c.jsonl.gz
        h.write_jsonl(directory / "a.jsonl", docs[:40])
        h.write_parquet(directory / "b.parquet", docs[40:80])
        h.write_jsonl(directory / "c.jsonl.gz", docs[80:], gz=True)
        return directory / "*"
    writer = {
        "jsonl": h.write_jsonl,
        "parquet": h.write_parquet,
        "jsonl.gz": lambda p, d: h.write_jsonl(p, d, gz=True),
    }[kind]
    writer(directory / f"part0.{kind}", docs[:half])
    writer(directory / f"part1.{kind}", docs[half:])
    return directory / f"*.{kind}"


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "txt", "parquet", "mixed"])
def test_round_trip_every_file_format(kind, tmp_path, tokenizer_path, tokenizer, docs, h):
    glob = _write_inputs(kind, tmp_path / "in", docs, h)
    m = prepare(_opts(tmp_path, tokenizer_path, glob), progress=False)
    _check_round_trip(m, tokenizer, docs, h)
    assert m.dtype == "uint16" and m.vocab_size == 400
    for split in m.splits.values():
        assert all(s.tokens == 700 for s in split.shards[:-1]) and 0 < split.shards[-1].tokens <= 700
    assert m.splits["val"].documents > 0 and m.splits["train"].documents > m.splits["val"].documents


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_hf_source_on_local_files(kind, tmp_path, tokenizer_path, tokenizer, docs, h):
    _write_inputs(kind, tmp_path / "hfdir", docs, h)
    m = prepare(_opts(tmp_path, tokenizer_path, tmp_path / "hfdir", source="hf"), progress=False)
    _check_round_trip(m, tokenizer, docs, h)
    assert m.source["source"] == "hf" and m.source["dataset"] == str(tmp_path / "hfdir")
    files = prepare(_opts(tmp_path, tokenizer_path, tmp_path / "hfdir" / f"*.{kind}", name="files"), progress=False)
    assert [s.sha256 for s in files.splits["train"].shards] == [s.sha256 for s in m.splits["train"].shards]


def test_unreachable_sources_raise_source_unavailable(tmp_path, tokenizer_path):
    with pytest.raises(SourceUnavailableError, match="no files match"):
        prepare(_opts(tmp_path, tokenizer_path, tmp_path / "nothing*.jsonl"), progress=False)
    with pytest.raises(SourceUnavailableError, match="Hugging Face"):
        prepare(_opts(tmp_path, tokenizer_path, "HuggingFaceFW/fineweb-edu", source="hf"), progress=False)
    with pytest.raises(SourceUnavailableError):
        prepare(_opts(tmp_path, tokenizer_path, tmp_path / "no_such_dir", source="hf"), progress=False)


def test_rerun_gives_byte_identical_shards_for_any_worker_count(tmp_path, tokenizer_path, docs, h):
    glob = _write_inputs("jsonl", tmp_path / "in", docs, h)
    a = prepare(_opts(tmp_path, tokenizer_path, glob, name="a", workers=1), progress=False)
    b = prepare(_opts(tmp_path, tokenizer_path, glob, name="b", workers=2), progress=False)
    for split in ("train", "val"):
        for sa, sb in zip(a.splits[split].shards, b.splits[split].shards, strict=True):
            assert (a.dir / sa.file).read_bytes() == (b.dir / sb.file).read_bytes()
    assert a.splits == b.splits and a.prep_options == b.prep_options


def test_prepare_is_idempotent_and_refuses_other_options(tmp_path, tokenizer_path, docs, h):
    glob = _write_inputs("jsonl", tmp_path / "in", docs, h)
    opts = _opts(tmp_path, tokenizer_path, glob)
    assert not is_prepared(opts)
    first = prepare(opts, progress=False)
    mtimes = {f.name: f.stat().st_mtime_ns for f in dataset_dir(opts).iterdir()}
    assert prepare(opts, progress=False) == first and is_prepared(opts)
    assert {f.name: f.stat().st_mtime_ns for f in dataset_dir(opts).iterdir()} == mtimes
    other = _opts(tmp_path, tokenizer_path, glob, shard_tokens=900)
    assert not is_prepared(other)
    with pytest.raises(DataError, match="shard_tokens"):
        prepare(other, progress=False)


def test_rerun_rewrites_a_missing_or_truncated_shard_of_a_finished_prep(tmp_path, tokenizer_path, docs, h):
    glob = _write_inputs("jsonl", tmp_path / "in", docs, h)
    opts = _opts(tmp_path, tokenizer_path, glob)
    first = prepare(opts, progress=False)
    shards = [s for split in first.splits.values() for s in split.shards]
    original = {s.file: (first.dir / s.file).read_bytes() for s in shards}
    (first.dir / shards[0].file).unlink()
    with open(first.dir / shards[-1].file, "r+b") as f:
        f.truncate(shards[-1].bytes - 2)
    assert not is_prepared(opts)
    assert prepare(opts, progress=False) == first and is_prepared(opts)
    assert {s.file: (first.dir / s.file).read_bytes() for s in shards} == original


def test_interrupted_prep_resumes_and_matches_a_clean_run(tmp_path, tokenizer_path, docs, h, monkeypatch):
    glob = _write_inputs("jsonl", tmp_path / "in", docs, h)
    clean = prepare(_opts(tmp_path, tokenizer_path, glob, name="clean"), progress=False)
    opts = _opts(tmp_path, tokenizer_path, glob, name="resumed")
    real_write, real_encode = prep_mod.write_shard, prep_mod._encode_chunk
    calls = {"write": 0, "docs": 0}

    def failing_write(*args):
        calls["write"] += 1
        if calls["write"] == 4:
            raise KeyboardInterrupt
        return real_write(*args)

    monkeypatch.setattr(prep_mod, "CHUNK_CHARS", 2000)
    monkeypatch.setattr(prep_mod, "write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(opts, progress=False)
    out = dataset_dir(opts)
    assert not (out / "manifest.json").exists() and (out / ".prep" / "state.json").exists()
    assert not list(out.glob("*.tmp"))
    state = json.loads((out / ".prep" / "state.json").read_text())
    assert state["docs_consumed"] > 0

    def counting_encode(texts):
        calls["docs"] += len(texts)
        return real_encode(texts)

    monkeypatch.setattr(prep_mod, "write_shard", real_write)
    monkeypatch.setattr(prep_mod, "_encode_chunk", counting_encode)
    resumed = prepare(opts, progress=False)
    assert calls["docs"] == len(docs) - state["docs_consumed"]  # finished documents are not re-tokenized
    assert resumed.splits == clean.splits
    assert not (out / ".prep").exists()


def test_tokenizer_is_trained_when_missing(tmp_path, docs, h):
    glob = _write_inputs("jsonl", tmp_path / "in", docs, h)
    tok_path = tmp_path / "new_tok.json"
    with pytest.raises(DataError, match="tokenizer-vocab-size"):
        prepare(_opts(tmp_path, tok_path, glob), progress=False)
    opts = _opts(tmp_path, tok_path, glob, tokenizer_vocab_size=320)
    m = prepare(opts, progress=False)
    assert tok_path.is_file() and m.vocab_size == 320 and is_prepared(opts)
    assert (m.dir / "tokenizer.json").read_text() == tok_path.read_text()


def test_val_rules(tmp_path, tokenizer_path, docs, h):
    glob = _write_inputs("jsonl", tmp_path / "in", docs, h)
    none = prepare(_opts(tmp_path, tokenizer_path, glob, name="none", val_fraction=0.0), progress=False)
    assert none.splits["val"].tokens == 0 and none.splits["train"].documents == len(docs)
    capped = prepare(
        _opts(tmp_path, tokenizer_path, glob, name="cap", val_fraction=None, val_tokens=300), progress=False
    )
    lengths = [d.size + 1 for d in h.split_documents(_stream(capped, "val"), capped.bos_id)]
    assert sum(lengths) == capped.splits["val"].tokens >= 300 > sum(lengths[:-1])  # stops once full
    assert 1 < len(lengths) < len(docs) / 8


def test_text_field_and_empty_documents(tmp_path, tokenizer_path, tokenizer, docs, h):
    (tmp_path / "in").mkdir()
    h.write_jsonl(tmp_path / "in" / "a.jsonl", docs[:10] + [""] + docs[10:20], field="content")
    with pytest.raises(DataError, match="--text-field.*content"):
        prepare(_opts(tmp_path, tokenizer_path, tmp_path / "in" / "*.jsonl", name="x"), progress=False)
    m = prepare(_opts(tmp_path, tokenizer_path, tmp_path / "in" / "*.jsonl", text_field="content"), progress=False)
    assert m.stats == {"documents_read": 21, "empty_documents_skipped": 1}
    _check_round_trip(m, tokenizer, docs[:10] + [""] + docs[10:20], h)
    h.write_parquet(tmp_path / "p.parquet", docs[:3], field="body")
    with pytest.raises(DataError, match="no column 'text'"):
        prepare(_opts(tmp_path, tokenizer_path, tmp_path / "p.parquet", name="p"), progress=False)


def test_max_docs(tmp_path, tokenizer_path, docs, h):
    glob = _write_inputs("jsonl", tmp_path / "in", docs, h)
    m = prepare(_opts(tmp_path, tokenizer_path, glob, max_docs=17), progress=False)
    assert m.splits["train"].documents + m.splits["val"].documents == 17


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"source": "hf", "dataset": "org/set", "dataset_config": "c 1", "dataset_split": "validation"},
        {
            "val_tokens": 5,
            "val_fraction": None,
            "max_docs": 3,
            "text_field": "body",
            "tokenizer_vocab_size": 1000,
            "shard_tokens": 12345,
        },
    ],
)
def test_prep_command_parses_back_to_the_same_options(tmp_path, extra):
    extra = extra if "dataset" in extra else {"input": "in/*.jsonl", **extra}
    opts = PrepOptions(data_dir="data dir", name="n", tokenizer="t.json", **extra)
    cmd = prep_command(opts)
    assert cmd.startswith("uv run nmoe-data prep ")
    assert _prep_options(_parser().parse_args(shlex.split(cmd)[3:])) == opts


def test_option_validation():
    with pytest.raises(DataError, match="needs input"):
        PrepOptions(data_dir="o", name="n", tokenizer="t")
    with pytest.raises(DataError, match="not both"):
        PrepOptions(data_dir="o", name="n", tokenizer="t", input="x", val_tokens=1, val_fraction=0.1)
    with pytest.raises(DataError, match="needs dataset"):
        PrepOptions(data_dir="o", name="n", tokenizer="t", source="hf")


def test_bad_inputs_name_the_file_and_line(tmp_path, tokenizer_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not JSON"):
        prepare(_opts(tmp_path, tokenizer_path, tmp_path / "bad.jsonl"), progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        prepare(_opts(tmp_path, tokenizer_path, tmp_path / "latin1.txt", name="l"), progress=False)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        prepare(_opts(tmp_path, tokenizer_path, tmp_path / "data.csv", name="c"), progress=False)


@pytest.mark.parametrize("content", ["", "\n\n", '{"text": ""}\n{"text": null}\n'])
def test_input_without_documents_is_refused(tmp_path, tokenizer_path, content):
    (tmp_path / "empty.jsonl").write_text(content)
    opts = _opts(tmp_path, tokenizer_path, tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=r"input '.*empty.jsonl' .*has no documents"):
        prepare(opts, progress=False)
    assert not (dataset_dir(opts) / "manifest.json").exists() and not is_prepared(opts)


def test_input_without_documents_trains_no_tokenizer(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    opts = _opts(tmp_path, tmp_path / "tok.json", tmp_path / "empty.jsonl", tokenizer_vocab_size=300)
    with pytest.raises(DataError, match=r"empty.jsonl.*has no documents.*all 1 documents read have an empty 'text'"):
        prepare(opts, progress=False)
    assert not (tmp_path / "tok.json").exists()  # a rerun after fixing the input must not reuse a blank tokenizer


def test_max_docs_and_text_field_name_no_documents_too(tmp_path, tokenizer_path, docs, h):
    h.write_jsonl(tmp_path / "a.jsonl", [""] * 3 + docs[:5])
    with pytest.raises(DataError, match="all 3 documents read"):
        prepare(_opts(tmp_path, tokenizer_path, tmp_path / "a.jsonl", max_docs=3), progress=False)
    m = prepare(_opts(tmp_path, tokenizer_path, tmp_path / "a.jsonl", max_docs=4, name="ok"), progress=False)
    assert m.stats == {"documents_read": 4, "empty_documents_skipped": 3}


def test_manifest_records_each_shards_max_token_id(tmp_path, tokenizer_path, docs, h):
    glob = _write_inputs("jsonl", tmp_path / "in", docs, h)
    m = prepare(_opts(tmp_path, tokenizer_path, glob), progress=False)
    assert m.format == "nmoe.data.manifest/2"
    for split in m.splits.values():
        for shard in split.shards:
            assert shard.max_id == int(np.load(m.dir / shard.file).max())
    assert json.loads((m.dir / "manifest.json").read_text())["splits"]["train"]["shards"][0]["max_id"] >= 0


def test_resume_from_a_state_saved_before_max_id(tmp_path, tokenizer_path, docs, h, monkeypatch):
    glob = _write_inputs("jsonl", tmp_path / "in", docs, h)
    clean = prepare(_opts(tmp_path, tokenizer_path, glob, name="clean"), progress=False)
    opts = _opts(tmp_path, tokenizer_path, glob, name="resumed")
    real_write, calls = prep_mod.write_shard, [0]

    def failing_write(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real_write(*args)

    monkeypatch.setattr(prep_mod, "CHUNK_CHARS", 2000)
    monkeypatch.setattr(prep_mod, "write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(opts, progress=False)
    state_file = dataset_dir(opts) / ".prep" / "state.json"
    state = json.loads(state_file.read_text())
    for split in state["splits"].values():
        for shard in split["shards"]:
            del shard["max_id"]  # as an older nmoe-data wrote it
    state_file.write_text(json.dumps(state))
    monkeypatch.setattr(prep_mod, "write_shard", real_write)
    assert prepare(opts, progress=False).splits == clean.splits
