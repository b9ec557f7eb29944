"""`nmoe-data`: prep | tokenizer train | prep-mixture | inspect."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nmoe.data.errors import DataError
from nmoe.data.prep import DEFAULT_SHARD_TOKENS, PrepOptions, default_workers, prepare


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=["files", "hf"], default="files",
                   help="'files': local --input glob; 'hf': Hugging Face dataset (streaming)")
    p.add_argument("--input", help="glob of .txt / .jsonl / .jsonl.gz / .parquet files (quote it)")
    p.add_argument("--dataset", help="hf dataset name or local folder, e.g. HuggingFaceFW/fineweb-edu")
    p.add_argument("--dataset-config", help="hf dataset config, e.g. sample-10BT")
    p.add_argument("--dataset-split", default="train", help="hf split (default: train)")
    p.add_argument("--text-field", default="text", help="column / JSON field holding the text (default: text)")
    p.add_argument("--max-docs", type=int, help="read at most this many documents")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nmoe-data", description="Prepare tokenized training data for nmoe.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prep", help="tokenize a corpus into .npy shards + manifest.json",
                       description="Tokenize documents into fixed-size shards. Re-running resumes an "
                                   "interrupted prep; a finished one is left as is.")
    _add_source_args(p)
    p.add_argument("--output", required=True, help="root directory; the dataset goes to OUTPUT/NAME")
    p.add_argument("--name", required=True, help="dataset name (subdirectory of --output)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or tiktoken rank file")
    p.add_argument("--tokenizer-vocab-size", type=int,
                   help="if --tokenizer does not exist, train one of this size on the input first")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,})")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-tokens", type=int, help="val split size in tokens (default 1,000,000; "
                     "documents drawn 1 in 16 by hash until full)")
    val.add_argument("--val-fraction", type=float, help="fraction of documents (by hash) that go to val")
    p.add_argument("--workers", type=int, help=f"tokenizer processes (default: cores = {default_workers()})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")

    t = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokcmd", required=True)
    tt = t.add_parser("train", help="train a byte-level BPE tokenizer on your text",
                      description="Train a byte-level BPE (GPT-4 split pattern, one <|bos|> token) on a "
                                  "deterministic sample: documents in order, each cut to --doc-chars, "
                                  "until --max-chars characters.")
    _add_source_args(tt)
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
    return PrepOptions(source=a.source, input=a.input, dataset=a.dataset, dataset_config=a.dataset_config,
                       dataset_split=a.dataset_split, text_field=a.text_field, output=a.output, name=a.name,
                       tokenizer=a.tokenizer, tokenizer_vocab_size=a.tokenizer_vocab_size,
                       shard_tokens=a.shard_tokens, val_tokens=a.val_tokens, val_fraction=a.val_fraction,
                       workers=a.workers, max_docs=a.max_docs)


def _cmd_tokenizer_train(a: argparse.Namespace) -> None:
    from itertools import islice

    from nmoe.data.prep import iter_source_documents
    from nmoe.data.tokenizer import Tokenizer

    probe = PrepOptions(source=a.source, input=a.input, dataset=a.dataset, dataset_config=a.dataset_config,
                        dataset_split=a.dataset_split, text_field=a.text_field, output=".", name="tokenizer",
                        tokenizer=a.output)
    docs = islice(iter_source_documents(probe), a.max_docs)
    tok = Tokenizer.train(docs, a.vocab_size, max_chars=a.max_chars, doc_chars=a.doc_chars, show_progress=True)
    tok.save(a.output)
    print(f"nmoe-data: wrote {a.output}: vocab {tok.vocab_size}, bos {tok.bos_token!r}={tok.bos_id}, "
          f"sha256 {tok.sha256}")


def _cmd_inspect(a: argparse.Namespace) -> None:
    from nmoe.data.manifest import Manifest
    from nmoe.data.shards import open_shard

    d = Path(a.dir)
    if (d / "mixture.json").is_file():
        doc = json.loads((d / "mixture.json").read_text())
        print(f"mixture {d}: vocab {doc['vocab_size']}, tokenizer sha256 {doc['tokenizer']['sha256'][:12]}")
        for ds in doc["datasets"]:
            print(f"  {ds['name']:<20} p={ds['probability']:.3f} weight={ds['weight']} "
                  f"temperature={ds['temperature']} train tokens {ds['train_tokens']:,}  {ds['path']}")
        return
    m = Manifest.load(d)
    if a.json:
        print(m.to_json(), end="")
        return
    print(f"dataset {d} ({m.name}): source {m.source}")
    print(f"  tokenizer {m.tokenizer['kind']} vocab {m.vocab_size} bos {m.bos_id} "
          f"sha256 {m.tokenizer['sha256'][:12]}, dtype {m.dtype}, shard_tokens {m.shard_tokens:,}")
    for name, s in m.splits.items():
        print(f"  {name:<5} {s.tokens:>14,} tokens {s.documents:>10,} documents {len(s.shards):>5} shards")
    if a.verify:
        for s in m.splits.values():
            for info in s.shards:
                open_shard(d, info, m.dtype, verify=True)
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
