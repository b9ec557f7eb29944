"""PrepOptions is the one schema of the data options: the CLI and a trainer's [data] section are built from it."""

import argparse
import dataclasses
import shlex
import types
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.data import DataError, PrepOptions, prep_command, prep_option_fields
from nmoe.data.cli import _parser, _prep_options
from nmoe.data.prep import SOURCE_FIELDS, base_type, cli_flag

HINTS = typing.get_type_hints(PrepOptions)
FIELDS = {f.name: f for f in prep_option_fields()}
REQUIRED = {"name": "n", "tokenizer": "t.json", "input": "in/*.jsonl"}


def _subparser(parser, *names):
    """The parser of `nmoe-data NAME [NAME ...]`."""
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def test_every_field_has_help_an_allowed_type_and_well_formed_limits():
    assert list(FIELDS)[:3] == ["source", "input", "dataset"]  # prep_command's order: source first
    for name, f in FIELDS.items():
        hint = HINTS[name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        assert set(args) - {type(None)} <= {str, int, float, bool} and len(set(args) - {type(None)}) == 1, name
        assert isinstance(f.metadata["help"], str) and len(f.metadata["help"]) > 10, name
        assert set(f.metadata) <= {"help", "range", "choices", "cli", "operational"}, name
        assert not ("range" in f.metadata and "choices" in f.metadata), name
        if "range" in f.metadata:
            lo, hi = f.metadata["range"]
            assert base_type(hint) in (int, float) and (lo is None or hi is None or lo <= hi), name
        if "choices" in f.metadata:
            assert isinstance(f.metadata["choices"], tuple) and f.default in f.metadata["choices"], name
        if f.default is not dataclasses.MISSING and f.default is not None:
            assert isinstance(f.default, base_type(hint)), name
    assert {n for n, f in FIELDS.items() if f.default is dataclasses.MISSING} == {"name", "tokenizer"}
    assert cli_flag(FIELDS["data_dir"]) == "--output" and cli_flag(FIELDS["max_docs"]) == "--max-docs"
    assert {n for n, f in FIELDS.items() if f.metadata.get("operational")} == {"data_dir", "workers"}


def test_the_decided_defaults():
    opts = PrepOptions(**REQUIRED)
    assert (opts.data_dir, opts.shard_tokens, opts.val_tokens) == ("data", 1 << 24, 1 << 20)
    assert (opts.workers, opts.max_docs, opts.tokenizer_vocab_size, opts.val_fraction) == (None, None, None, None)


def test_cli_has_one_flag_per_field_with_the_schema_default():
    prep = _subparser(_parser(), "prep")
    actions = {a.dest: a for a in prep._actions}
    for name, f in FIELDS.items():
        assert cli_flag(f) in actions[name].option_strings, name
        assert actions[name].required == (f.default is dataclasses.MISSING), name
        if f.default is not dataclasses.MISSING:
            assert actions[name].default == f.default, name
        assert actions[name].choices == f.metadata.get("choices"), name
    args = _parser().parse_args(["prep", "--input", "in/*.jsonl", "--name", "n", "--tokenizer", "t.json"])
    assert _prep_options(args) == PrepOptions(**REQUIRED)
    train = _subparser(_parser(), "tokenizer", "train")
    assert {a.dest for a in train._actions} >= set(SOURCE_FIELDS)


def test_a_new_field_appears_in_the_cli(monkeypatch):
    extra = dataclasses.make_dataclass(
        "Extended",
        [
            ("dedupe", bool, dataclasses.field(default=False, metadata={"help": "drop duplicate documents"})),
            (
                "min_chars",
                int | None,
                dataclasses.field(default=None, metadata={"help": "drop short", "range": (0, 9)}),
            ),
        ],
        bases=(PrepOptions,),
        frozen=True,
        kw_only=True,
    )
    import nmoe.data.cli as cli

    monkeypatch.setattr(cli, "PrepOptions", extra)
    monkeypatch.setattr(cli, "prep_option_fields", lambda: dataclasses.fields(extra))
    a = cli._parser().parse_args(["prep", "--input", "x", "--name", "n", "--tokenizer", "t", "--dedupe"])
    assert a.dedupe is True and a.min_chars is None
    a = cli._parser().parse_args(["prep", "--input", "x", "--name", "n", "--tokenizer", "t", "--min-chars", "3"])
    assert a.dedupe is False and a.min_chars == 3


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("shard_tokens", 0, r"shard_tokens \(--shard-tokens\) = 0 is out of range \[1, inf\]"),
        ("workers", 0, r"workers \(--workers\) = 0 is out of range \[1, 1024\]"),
        ("max_docs", 0, r"max_docs \(--max-docs\) = 0 is out of range"),
        ("tokenizer_vocab_size", 100, r"tokenizer_vocab_size \(--tokenizer-vocab-size\) = 100 is out of range"),
        ("val_fraction", 1.5, r"val_fraction \(--val-fraction\) = 1.5 is out of range \[0.0, 1.0\]"),
        ("val_fraction", 1.0, r"val_fraction must be < 1"),
        ("val_fraction", float("nan"), r"val_fraction \(--val-fraction\) = nan must be a finite number"),
        ("source", "s3", r"source \(--source\) = 's3' is not allowed; choose one of 'files', 'hf'"),
        ("shard_tokens", "many", r"shard_tokens \(--shard-tokens\) must be int, got 'many'"),
        ("shard_tokens", True, r"must be int, got True"),
        ("name", None, r"name \(--name\) must be str"),
        ("data_dir", 3, r"data_dir \(--output\) must be str"),
    ],
)
def test_bad_values_name_the_key_and_the_flag(key, value, message):
    with pytest.raises(DataError, match=message):
        PrepOptions(**{**REQUIRED, key: value})


def test_paths_become_strings_and_ints_floats(tmp_path):
    opts = PrepOptions(
        name="n", tokenizer=tmp_path / "t.json", input=tmp_path / "x.jsonl", data_dir=tmp_path, val_fraction=0
    )
    assert opts.tokenizer == str(tmp_path / "t.json") and opts.data_dir == str(tmp_path)
    assert opts.val_fraction == 0.0 and isinstance(opts.val_fraction, float)


def test_a_trainer_section_derived_from_the_fields_round_trips():
    """The recipe the trainer uses for its [data] section: the PrepOptions fields plus its own keys."""
    own = [("mixture", str, dataclasses.field(default="", metadata={"help": "mixture TOML"}))]
    section = dataclasses.make_dataclass(
        "DataConfig",
        [(f.name, HINTS[f.name], dataclasses.field(default=f.default, metadata=f.metadata)) for f in FIELDS.values()]
        + own,
        frozen=True,
        kw_only=True,
    )
    data = section(name="n", tokenizer="t.json", input="x", shard_tokens=4096, workers=2)
    opts = PrepOptions(**{f.name: getattr(data, f.name) for f in prep_option_fields()})
    assert opts == PrepOptions(name="n", tokenizer="t.json", input="x", shard_tokens=4096, workers=2)
    assert typing.get_type_hints(section)["max_docs"] == int | None


@settings(max_examples=40, deadline=None)
@given(
    shard_tokens=st.integers(1, 10**9),
    val=st.one_of(
        st.integers(0, 10**8).map(lambda v: {"val_tokens": v}), st.floats(0, 0.99).map(lambda v: {"val_fraction": v})
    ),
    max_docs=st.one_of(st.none(), st.integers(1, 10**7)),
    workers=st.one_of(st.none(), st.integers(1, 1024)),
    vocab=st.one_of(st.none(), st.integers(257, 1 << 22)),
    hf=st.booleans(),
    text_field=st.sampled_from(["text", "content body"]),
)
def test_prep_command_round_trips_through_the_cli(shard_tokens, val, max_docs, workers, vocab, hf, text_field):
    source = {"source": "hf", "dataset": "org/set", "dataset_config": "c"} if hf else {"input": "in dir/*.jsonl"}
    opts = PrepOptions(
        name="n",
        tokenizer="t.json",
        data_dir="d d",
        shard_tokens=shard_tokens,
        max_docs=max_docs,
        workers=workers,
        tokenizer_vocab_size=vocab,
        text_field=text_field,
        **source,
        **val,
    )
    argv = shlex.split(prep_command(opts))
    assert argv[:4] == ["uv", "run", "nmoe-data", "prep"] and argv[4:6] == ["--source", opts.source]
    assert _prep_options(_parser().parse_args(argv[3:])) == opts


def test_an_empty_string_means_not_given_and_other_sources_options_stay_off_the_command():
    opts = PrepOptions(name="n", tokenizer="t", source="hf", dataset="org/set", input="", dataset_config="")
    assert opts.input is None and opts.dataset_config is None
    cmd = prep_command(PrepOptions(name="n", tokenizer="t", source="hf", dataset="org/set", input="x/*.txt"))
    assert cmd.startswith("uv run nmoe-data prep --source hf --dataset org/set --output data") and "x/" not in cmd
    cmd = prep_command(PrepOptions(name="n", tokenizer="t", input="x.txt", dataset="d", dataset_split="s"))
    assert cmd == "uv run nmoe-data prep --source files --input x.txt --output data --name n --tokenizer t"
    with pytest.raises(DataError, match="needs input"):
        PrepOptions(name="n", tokenizer="t", input="")
