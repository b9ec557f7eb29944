"""`nmoe-data`: prep | tokenizer train | prep-mixture | inspect."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import MISSING
from pathlib import Path

from nmoe.data.errors import DataError
from nmoe.data.prep import (
    SOURCE_FIELDS,
    PrepOptions,
    base_type,
    cli_flag,
    default_workers,
    prep_option_fields,
    prepare,
)


def _add_option_args(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One flag per PrepOptions field (or the fields in `names`), typed, defaulted and checked from its schema."""
    hints = typing.get_type_hints(PrepOptions)
    for f in prep_option_fields():
        if names is not None and f.name not in names:
            continue
        kind = base_type(hints[f.name])
        help_text = f.metadata["help"].replace("%", "%%")
        if "range" in f.metadata:
            lo, hi = f.metadata["range"]
            help_text += f"; range [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        kw: dict = {"dest": f.name}
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
            shown = f"{f.default:,}" if type(f.default) is int else f.default
            help_text += f" (default: {shown}{f', here {default_workers()}' if f.name == 'workers' else ''})"
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        elif kind is not bool:
            kw["metavar"] = f.name.upper()
        p.add_argument(cli_flag(f), help=help_text, **kw)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nmoe-data", description="Prepare tokenized training data for nmoe.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prep",
        help="tokenize a corpus into .npy shards + manifest.json",
        description="Tokenize documents into fixed-size shards. Re-running resumes an "
        "interrupted prep; a finished one is left as is. The flags are the fields of "
        "nmoe.data.PrepOptions, the [data] keys of a training config.",
    )
    _add_option_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")

    t = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokcmd", required=True)
    tt = t.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on your text",
        description="Train a byte-level BPE (GPT-4 split pattern, one <|bos|> token) on a "
        "deterministic sample: documents in order, each cut to --doc-chars, "
        "until --max-chars characters.",
    )
    _add_option_args(tt, SOURCE_FIELDS)
    tt.add_argument("--vocab-size", type=int, required=True, help="tokens including <|bos|>, >= 257")
    tt.add_argument("--output", required=True, help="where to write tokenizer.json")
    tt.add_argument("--max-chars", type=int, default=1_000_000_000, help="characters to train on")
    tt.add_argument("--doc-chars", type=int, default=10_000, help="characters kept per document")

    m = sub.add_parser("prep-mixture", help="prepare every dataset of a mixture TOML + mixture.json")
    m.add_argument("--mixture", required=True, help="mixture TOML (see nmoe.data.mixture for the format)")
    m.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("inspect", help="summarise a prepared dataset or mixture dir")
    i.add_argument("dir", help="dataset dir (with manifest.json) or mixture dir (with mixture.json)")
    i.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return ap


def _prep_options(a: argparse.Namespace) -> PrepOptions:
    return PrepOptions(**{f.name: getattr(a, f.name) for f in prep_option_fields()})


def _cmd_tokenizer_train(a: argparse.Namespace) -> None:
    from itertools import islice

    from nmoe.data.prep import iter_source_documents
    from nmoe.data.tokenizer import Tokenizer

    probe = PrepOptions(**{k: getattr(a, k) for k in SOURCE_FIELDS}, name="tokenizer", tokenizer=a.output)
    docs = islice(iter_source_documents(probe), probe.max_docs)
    tok = Tokenizer.train(docs, a.vocab_size, max_chars=a.max_chars, doc_chars=a.doc_chars, show_progress=True)
    tok.save(a.output)
    print(
        f"nmoe-data: wrote {a.output}: vocab {tok.vocab_size}, bos {tok.bos_token!r}={tok.bos_id}, sha256 {tok.sha256}"
    )


def _cmd_inspect(a: argparse.Namespace) -> None:
    from nmoe.data.manifest import Manifest
    from nmoe.data.shards import open_shard

    d = Path(a.dir)
    if (d / "mixture.json").is_file():
        doc = json.loads((d / "mixture.json").read_text())
        print(f"mixture {d}: vocab {doc['vocab_size']}, tokenizer sha256 {doc['tokenizer']['sha256'][:12]}")
        for ds in doc["datasets"]:
            print(
                f"  {ds['name']:<20} p={ds['probability']:.3f} weight={ds['weight']} "
                f"temperature={ds['temperature']} train tokens {ds['train_tokens']:,}  {ds['path']}"
            )
        return
    m = Manifest.load(d)
    if a.json:
        print(m.to_json(), end="")
        return
    print(f"dataset {d} ({m.name}): source {m.source}")
    print(
        f"  tokenizer {m.tokenizer['kind']} vocab {m.vocab_size} bos {m.bos_id} "
        f"sha256 {m.tokenizer['sha256'][:12]}, dtype {m.dtype}, shard_tokens {m.shard_tokens:,}"
    )
    for name, s in m.splits.items():
        ids = [info.max_id for info in s.shards]
        if a.verify:
            ids = [open_shard(d, info, m.dtype, verify=True)[1] for info in s.shards]
        max_id = "unknown (manifest format 1)" if None in ids else max(ids, default=-1)
        print(
            f"  {name:<5} {s.tokens:>14,} tokens {s.documents:>10,} documents {len(s.shards):>5} shards, "
            f"max token id {max_id}"
        )
    if a.verify:
        print(f"  verified sha256 of {sum(len(s.shards) for s in m.splits.values())} shards: OK")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nmoe-data` command; returns the exit status."""
    a = _parser().parse_args(argv)
    try:
        if a.command == "prep":
            opts = _prep_options(a)
            prepare(opts, progress=not a.no_progress)
        elif a.command == "tokenizer":
            _cmd_tokenizer_train(a)
        elif a.command == "prep-mixture":
            from nmoe.data.mixture import prep_mixture

            prep_mixture(a.mixture, progress=not a.no_progress)
        elif a.command == "inspect":
            _cmd_inspect(a)
    except DataError as e:
        print(f"nmoe-data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nmoe-data: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
