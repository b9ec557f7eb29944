"""`prepare`: stream documents, tokenize them in worker processes, write shards + manifest.json.

Output layout of `dataset_dir(opts)` (= data_dir/name):
  train_000000.npy ...  val_000000.npy ...   fixed-size uint16/uint32 shards, documents in stream
                                              order, each document preceded by the bos token
  tokenizer.json | tokenizer.tiktoken        copy of the tokenizer used
  manifest.json                              written last: its presence marks a finished prep
  .prep/                                     resume state while a prep is running
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import time
import types
import typing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from itertools import chain, islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from nmoe.data.errors import DataError
from nmoe.data.manifest import MANIFEST, Manifest, ShardInfo, SplitInfo
from nmoe.data.shards import atomic_save_npy, atomic_write_text, token_dtype, write_shard
from nmoe.data.sources import expand_glob, iter_file_documents, iter_hf_documents
from nmoe.data.tokenizer import Tokenizer

SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 24
DEFAULT_VAL_TOKENS = 1 << 20
# With val_tokens N, each document is a val candidate with this probability (by a hash of its
# index) until val holds N tokens, so val is spread over the stream instead of being its head.
VAL_TOKENS_RATE = 1 / 16
CHUNK_CHARS = 1 << 19  # characters of text sent to a worker per task
STATE_DIR = ".prep"
SHARD_RE = re.compile(r"^(train|val)_\d{6}\.npy$")
# The options that say which documents are read (also the source arguments of `nmoe-data tokenizer train`).
SOURCE_FIELDS = ("source", "input", "dataset", "dataset_config", "dataset_split", "text_field", "max_docs")


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _opt(default=MISSING, help: str = "", *, range=None, choices=None, cli=None, operational=False):
    """A PrepOptions field with its schema metadata (see PrepOptions)."""
    meta = {"help": help}
    if range is not None:
        meta["range"] = range
    if choices is not None:
        meta["choices"] = choices
    if cli is not None:
        meta["cli"] = cli
    if operational:
        meta["operational"] = True
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class PrepOptions:
    """Everything `prepare` needs; the same options always produce byte-identical shards.

    The one schema of the data options: the `nmoe-data prep` flags are built from these fields
    (`--field-name`, or metadata "cli"), and a training config's `[data]` section holds them under
    the same names. Field metadata: "help"; "range": (lo, hi), inclusive, None = open; or
    "choices"; optionally "cli" (the flag, when not `--field-name`) and "operational": True (the
    value never changes the shard bytes, so it is not part of the prep fingerprint). Types are
    str, int, float, bool or `X | None`; None means "not given" (see each help).
    """

    source: str = _opt(
        "files",
        "where prep reads text from: 'files' (input glob) or 'hf' (Hugging Face dataset, streamed)",
        choices=("files", "hf"),
    )
    input: str | None = _opt(
        None,
        "glob of .txt / .jsonl / .jsonl.gz / .parquet files, relative to the current "
        "directory (source = files; quote it in a shell)",
    )
    dataset: str | None = _opt(
        None, "Hugging Face dataset id or local folder, e.g. HuggingFaceFW/fineweb-edu (source = hf)"
    )
    dataset_config: str | None = _opt(None, "Hugging Face dataset config, e.g. sample-10BT (source = hf)")
    dataset_split: str = _opt("train", "Hugging Face split (source = hf)")
    data_dir: str = _opt(
        "data",
        "root folder of prepared datasets: the dataset goes to {data_dir}/{name}",
        cli="--output",
        operational=True,
    )
    name: str = _opt(help="dataset name: its shards and manifest.json go to {data_dir}/{name}")
    tokenizer: str = _opt(
        help="tokenizer file (tokenizer.json or tiktoken rank file); when missing and "
        "tokenizer_vocab_size is given, one is trained on the source first"
    )
    text_field: str = _opt("text", "column / JSON field holding the text")
    tokenizer_vocab_size: int | None = _opt(
        None,
        "vocab size of the tokenizer trained when the tokenizer file is missing (None: the file must exist)",
        range=(257, 1 << 22),
    )
    shard_tokens: int = _opt(DEFAULT_SHARD_TOKENS, "tokens per shard file", range=(1, None))
    val_tokens: int = _opt(
        DEFAULT_VAL_TOKENS,
        "tokens held out for validation: documents drawn 1 in 16 by hash "
        "until val holds this many (not used when val_fraction is given)",
        range=(0, None),
    )
    val_fraction: float | None = _opt(
        None,
        "fraction of documents (chosen by hash) held out for validation, instead of val_tokens; must be < 1",
        range=(0.0, 1.0),
    )
    workers: int | None = _opt(None, "tokenizer processes (None: one per CPU core)", range=(1, 1024), operational=True)
    max_docs: int | None = _opt(None, "read at most this many documents (None: all)", range=(1, None))

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _checked(f, hints[f.name], getattr(self, f.name)))
        if self.source == "files" and not self.input:
            raise DataError("source 'files' needs input, a glob such as 'corpus/*.jsonl.gz' (--input)")
        if self.source == "hf" and not self.dataset:
            raise DataError("source 'hf' needs dataset, e.g. 'HuggingFaceFW/fineweb-edu' (--dataset)")
        if not self.name or "/" in self.name:
            raise DataError(f"name must be a non-empty directory name, got {self.name!r}")
        if self.val_fraction is not None and self.val_tokens != DEFAULT_VAL_TOKENS:
            raise DataError("give val_tokens or val_fraction, not both (--val-tokens / --val-fraction)")
        if self.val_fraction is not None and self.val_fraction >= 1:
            raise DataError(f"val_fraction must be < 1 (1 leaves no training data), got {self.val_fraction}")


def prep_option_fields() -> tuple[Field, ...]:
    """The PrepOptions fields: the keys a training config's [data] section must include (same names, types,
    defaults and metadata; resolve the types with typing.get_type_hints(PrepOptions))."""
    return fields(PrepOptions)


def cli_flag(f: Field) -> str:
    """The command-line flag of a PrepOptions field: metadata "cli", or `--field-name`."""
    return f.metadata.get("cli", "--" + f.name.replace("_", "-"))


def base_type(hint) -> type:
    """str, int, float or bool: the type of a PrepOptions field without its `| None`."""
    args = [t for t in typing.get_args(hint) if t is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    return args[0]


def _checked(f: Field, hint, value):
    """`value` of field `f` after its type / choices / range check; DataError naming the field and flag."""
    where = f"{f.name} ({cli_flag(f)})"
    if isinstance(hint, types.UnionType) and (value is None or value == ""):
        return None  # TOML has no null: an empty string means "not given"
    kind = base_type(hint)
    if kind is str and isinstance(value, os.PathLike):
        value = os.fspath(value)
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(
            f"{where} must be {kind.__name__}, got {value!r} ({type(value).__name__}); {f.metadata['help']}"
        )
    if kind is float and not math.isfinite(value):
        raise DataError(f"{where} = {value!r} must be a finite number; {f.metadata['help']}")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise DataError(
            f"{where} = {value!r} is not allowed; choose one of {', '.join(map(repr, f.metadata['choices']))}"
        )
    if "range" in f.metadata:
        lo, hi = f.metadata["range"]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise DataError(f"{where} = {value!r} is out of range {span}; {f.metadata['help']}")
    return value


def dataset_dir(opts: PrepOptions) -> Path:
    """Directory holding the shards and manifest.json: data_dir/name."""
    return Path(opts.data_dir) / opts.name


def _val_rule(opts: PrepOptions) -> dict:
    if opts.val_fraction is not None:
        return {"val_fraction": opts.val_fraction}
    return {"val_tokens": opts.val_tokens}


def _fingerprint(opts: PrepOptions, tok: Tokenizer) -> dict:
    """Everything that determines the shard bytes (not workers, data_dir or paths of the tokenizer)."""
    src = {"source": opts.source, "text_field": opts.text_field}
    if opts.source == "files":
        src["input"] = str(opts.input)
    else:
        src.update(dataset=opts.dataset, dataset_config=opts.dataset_config, dataset_split=opts.dataset_split)
    return {
        **src,
        **_val_rule(opts),
        "shard_tokens": opts.shard_tokens,
        "max_docs": opts.max_docs,
        "tokenizer_sha256": tok.sha256,
    }


# Always on the command line (the others only when they differ from their default).
_ALWAYS_SHOWN = ("source", "data_dir")
# Options that only one kind of source reads.
_SOURCE_ONLY = {"input": "files", "dataset": "hf", "dataset_config": "hf", "dataset_split": "hf"}


def prep_command(opts: PrepOptions) -> str:
    """The `uv run nmoe-data prep ...` command line that prepares exactly `opts`."""
    args = ["uv", "run", "nmoe-data", "prep"]
    for f in prep_option_fields():
        value = getattr(opts, f.name)
        if f.default is not MISSING and value == f.default and f.name not in _ALWAYS_SHOWN:
            continue
        if _SOURCE_ONLY.get(f.name, opts.source) != opts.source:
            continue
        if isinstance(value, bool):
            args.append(cli_flag(f) if value else "--no-" + cli_flag(f).removeprefix("--"))
        else:
            args += [cli_flag(f), str(value)]
    return shlex.join(args)


def iter_source_documents(opts: PrepOptions) -> Iterator[str]:
    """The source's documents in their deterministic order (all of them; max_docs not applied)."""
    if opts.source == "files":
        return iter_file_documents(expand_glob(opts.input), opts.text_field)
    return iter_hf_documents(opts.dataset, opts.dataset_config, opts.dataset_split, opts.text_field)


def _existing_manifest(out: Path) -> Manifest | None:
    return Manifest.load(out) if (out / MANIFEST).is_file() else None


def _damaged_shards(m: Manifest) -> list[str]:
    """Shard files of a finished prep that are missing or have the wrong size (a cheap stat, no hashing)."""
    damaged = []
    for split in m.splits.values():
        for info in split.shards:
            path = m.dir / info.file
            if not path.is_file() or path.stat().st_size != info.bytes:
                damaged.append(info.file)
    return damaged


def is_prepared(opts: PrepOptions) -> bool:
    """True when dataset_dir(opts) holds a finished prep of exactly these options and tokenizer, every shard present."""
    out = dataset_dir(opts)
    if not (out / MANIFEST).is_file() or not Path(opts.tokenizer).is_file():
        return False
    try:
        m = Manifest.load(out)
        return m.prep_options == _fingerprint(opts, Tokenizer.load(opts.tokenizer)) and not _damaged_shards(m)
    except DataError:
        return False


def ensure_tokenizer(opts: PrepOptions, progress: bool = True) -> Tokenizer:
    """Load opts.tokenizer, or train it on the source when absent and tokenizer_vocab_size is set."""
    path = Path(opts.tokenizer)
    if path.is_file():
        return Tokenizer.load(path)
    if not opts.tokenizer_vocab_size:
        raise DataError(
            f"tokenizer {path} does not exist; set tokenizer_vocab_size (--tokenizer-vocab-size N) to train it "
            f"from the source, or run `uv run nmoe-data tokenizer train --input GLOB --vocab-size N --output {path}`"
        )
    docs = islice(iter_source_documents(opts), opts.max_docs)
    read = 0
    for first in docs:  # never leave a tokenizer trained on nothing behind
        read += 1
        if first:
            break
    else:
        raise _no_documents(opts, read)
    if progress:
        print(f"nmoe-data: training a {opts.tokenizer_vocab_size}-token BPE tokenizer -> {path}", flush=True)
    t0 = time.perf_counter()
    tok = Tokenizer.train(chain([first], docs), opts.tokenizer_vocab_size, text_field=opts.text_field)
    tok.save(path)
    if progress:
        print(f"nmoe-data: tokenizer trained in {time.perf_counter() - t0:.1f}s (sha256 {tok.sha256[:12]})", flush=True)
    return tok


def prepare(opts: PrepOptions, progress: bool = True) -> Manifest:
    """Tokenize the source into shards + manifest.json; idempotent, resumes an interrupted run, and
    prepares again when a shard of a finished run is missing or has the wrong size."""
    out = dataset_dir(opts)
    tok = ensure_tokenizer(opts, progress)
    fingerprint = _fingerprint(opts, tok)
    existing = _existing_manifest(out)
    if existing is not None and existing.prep_options == fingerprint:
        damaged = _damaged_shards(existing)
        if not damaged:
            return existing
        if progress:
            print(
                f"nmoe-data: {len(damaged)} shard(s) of {out} missing or damaged ({', '.join(damaged[:3])}"
                f"{', ...' if len(damaged) > 3 else ''}); preparing again",
                flush=True,
            )
        (out / MANIFEST).unlink()  # the shards are deterministic: a fresh prep rewrites identical bytes
        existing = None
    if existing is not None:
        changed = sorted(k for k in fingerprint if existing.prep_options.get(k) != fingerprint[k])
        raise DataError(
            f"{out} already holds a dataset prepared with different {', '.join(changed)}; "
            f"choose another --name or delete {out}"
        )
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    dtype = token_dtype(tok.vocab_size).name
    state = _PrepState.load(out, fingerprint, dtype, progress) or _PrepState(fingerprint, dtype)
    t0 = time.perf_counter()
    resumed_from = state.docs_consumed
    _run(opts, tok, out, state, progress)
    if state.docs_consumed == state.empty_documents:
        raise _no_documents(opts, state.docs_consumed)
    manifest = _finish(opts, tok, out, state)
    if progress:
        _print_summary(manifest, time.perf_counter() - t0, resumed_from)
    return manifest


def _source_description(opts: PrepOptions) -> str:
    if opts.source == "hf":
        return f"Hugging Face dataset {opts.dataset!r} (split {opts.dataset_split!r})"
    files = [str(p) for p in expand_glob(opts.input)]
    if files == [str(opts.input)]:
        return f"input {opts.input!r}"
    listed = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    return f"input {opts.input!r} ({len(files)} file{'s' if len(files) > 1 else ''}: {listed})"


def _no_documents(opts: PrepOptions, read: int) -> DataError:
    what = "it holds none" if read == 0 else f"all {read} documents read have an empty {opts.text_field!r} field"
    return DataError(
        f"{_source_description(opts)} has no documents to prepare: {what}. Point input (--input) at files that "
        "hold text, or set text_field (--text-field) to the field that holds it"
    )


# ---------------------------------------------------------------- resume state
@dataclass
class _SplitState:
    shards: list[ShardInfo] = field(default_factory=list)
    documents: int = 0
    pending: list[np.ndarray] = field(default_factory=list)
    pending_tokens: int = 0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards) + self.pending_tokens


@dataclass
class _PrepState:
    fingerprint: dict
    dtype: str
    docs_consumed: int = 0
    empty_documents: int = 0
    splits: dict[str, _SplitState] = field(default_factory=lambda: {s: _SplitState() for s in SPLITS})

    def save(self, out: Path) -> None:
        """Persist after a shard was written: pending tokens first, then the json that names them."""
        sdir = out / STATE_DIR
        sdir.mkdir(exist_ok=True)
        pending_files = {}
        for split, st in self.splits.items():
            name = f"pending_{split}_{self.docs_consumed}.npy"
            atomic_save_npy(sdir / name, _concat(st.pending, self.dtype))
            pending_files[split] = name
        doc = {
            "fingerprint": self.fingerprint,
            "docs_consumed": self.docs_consumed,
            "empty_documents": self.empty_documents,
            "splits": {
                s: {"shards": [vars(i) for i in st.shards], "documents": st.documents, "pending": pending_files[s]}
                for s, st in self.splits.items()
            },
        }
        atomic_write_text(sdir / "state.json", json.dumps(doc, sort_keys=True))
        for f in sdir.glob("pending_*.npy"):
            if f.name not in pending_files.values():
                f.unlink()

    @classmethod
    def load(cls, out: Path, fingerprint: dict, dtype: str, progress: bool) -> _PrepState | None:
        """The saved state of an interrupted prep of the same options, or None (start afresh)."""
        sdir = out / STATE_DIR
        try:
            doc = json.loads((sdir / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            shutil.rmtree(sdir, ignore_errors=True)
            return None
        if doc["fingerprint"] != fingerprint:
            if progress:
                print(f"nmoe-data: discarding an interrupted prep of {out} made with other options", flush=True)
            shutil.rmtree(sdir)
            return None
        state = cls(fingerprint, dtype, doc["docs_consumed"], doc["empty_documents"], {})
        for split, sd in doc["splits"].items():
            shards = [ShardInfo(**s) for s in sd["shards"]]
            if any(not (out / s.file).is_file() or (out / s.file).stat().st_size != s.bytes for s in shards):
                shutil.rmtree(sdir)
                return None
            shards = [_with_max_id(out, s) for s in shards]  # state saved by an nmoe-data before max_id
            pending = np.load(sdir / sd["pending"], allow_pickle=False).astype(dtype, copy=False)
            state.splits[split] = _SplitState(shards, sd["documents"], [pending], int(pending.size))
        if progress:
            print(f"nmoe-data: resuming {out} after {state.docs_consumed} documents", flush=True)
        return state


def _with_max_id(out: Path, info: ShardInfo) -> ShardInfo:
    if info.max_id is not None:
        return info
    tokens = np.load(out / info.file, mmap_mode="r", allow_pickle=False)
    return replace(info, max_id=int(tokens.max()) if tokens.size else -1)


def _concat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# ---------------------------------------------------------------- tokenization
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(kind: str, serialized: str, bos_token: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(kind, serialized, bos_token)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of all `texts` concatenated, each non-empty one preceded by bos; and per-text lengths."""
    tok = _WORKER_TOKENIZER
    flat: list[int] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        if text:
            before = len(flat)
            flat.append(tok.bos_id)
            flat.extend(tok.encode(text))
            lengths[i] = len(flat) - before
    return np.array(flat, dtype=token_dtype(tok.vocab_size)), lengths


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for text in docs:
        chunk.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _tokenized(chunks: Iterator[list[str]], tok: Tokenizer, workers: int):
    """Yield (texts, (tokens, lengths)) in input order; at most 2*workers chunks in flight."""
    if workers == 1:
        _init_worker(tok.kind, tok.to_str(), tok.bos_token)
        for texts in chunks:
            yield texts, _encode_chunk(texts)
        return
    ctx = get_context("spawn")  # fork is unsafe in a threaded parent (e.g. a trainer)
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(tok.kind, tok.to_str(), tok.bos_token)
    ) as pool:
        inflight: deque = deque()
        for texts in chunks:
            inflight.append((texts, pool.submit(_encode_chunk, texts)))
            if len(inflight) >= 2 * workers:
                texts0, fut = inflight.popleft()
                yield texts0, fut.result()
        while inflight:
            texts0, fut = inflight.popleft()
            yield texts0, fut.result()


def _is_val_candidate(index: int, probability: float) -> bool:
    """Deterministic per-document coin: splitmix64 of the document index."""
    m = (1 << 64) - 1
    z = (index + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) < probability * 2.0**64


def _run(opts: PrepOptions, tok: Tokenizer, out: Path, state: _PrepState, progress: bool) -> None:
    from tqdm import tqdm

    rule = _val_rule(opts)
    val_probability = rule.get("val_fraction", VAL_TOKENS_RATE)
    val_cap = rule.get("val_tokens")
    workers = opts.workers or default_workers()
    docs = islice(iter_source_documents(opts), state.docs_consumed, opts.max_docs)
    bar = tqdm(
        total=opts.max_docs,
        initial=state.docs_consumed,
        unit="doc",
        disable=not progress,
        desc=f"prep {opts.name}",
        dynamic_ncols=True,
    )
    t0, tokens_done = time.perf_counter(), 0
    with bar:
        for texts, (tokens, lengths) in _tokenized(_chunks(docs), tok, workers):
            ends = np.cumsum(lengths)
            for n, end in zip(lengths.tolist(), ends.tolist()):
                index = state.docs_consumed
                state.docs_consumed += 1
                if n == 0:
                    state.empty_documents += 1
                    continue
                val = _is_val_candidate(index, val_probability) and (
                    val_cap is None or state.splits["val"].tokens < val_cap
                )
                if _add(
                    out,
                    "val" if val else "train",
                    state.splits["val" if val else "train"],
                    tokens[end - n : end],
                    opts.shard_tokens,
                ):
                    state.save(out)
            tokens_done += int(tokens.size)
            bar.update(len(texts))
            bar.set_postfix_str(f"{tokens_done / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)


def _add(out: Path, split: str, st: _SplitState, doc: np.ndarray, shard_tokens: int) -> bool:
    """Append a document's tokens; write every full shard. True when a shard was written."""
    st.documents += 1
    st.pending.append(doc)
    st.pending_tokens += doc.size
    if st.pending_tokens < shard_tokens:
        return False
    buf = _concat(st.pending, doc.dtype)
    start = 0
    while buf.size - start >= shard_tokens:
        st.shards.append(write_shard(out, split, len(st.shards), buf[start : start + shard_tokens]))
        start += shard_tokens
    st.pending = [buf[start:].copy()]
    st.pending_tokens = int(st.pending[0].size)
    return True


def _finish(opts: PrepOptions, tok: Tokenizer, out: Path, state: _PrepState) -> Manifest:
    """Write the last partial shards, the tokenizer copy and manifest.json; drop stale files."""
    for split, st in state.splits.items():
        if st.pending_tokens:
            st.shards.append(write_shard(out, split, len(st.shards), _concat(st.pending, state.dtype)))
            st.pending, st.pending_tokens = [], 0
    tok_file = "tokenizer.json" if tok.kind == "hf" else "tokenizer.tiktoken"
    tok.save(out / tok_file)
    fingerprint = state.fingerprint
    source = {
        k: fingerprint[k] for k in ("source", "input", "dataset", "dataset_config", "dataset_split") if k in fingerprint
    }
    manifest = Manifest(
        name=opts.name,
        source=source,
        tokenizer={**tok.identity, "file": tok_file},
        vocab_size=tok.vocab_size,
        bos_id=tok.bos_id,
        dtype=token_dtype(tok.vocab_size).name,
        shard_tokens=opts.shard_tokens,
        splits={s: SplitInfo(st.tokens, st.documents, tuple(st.shards)) for s, st in state.splits.items()},
        prep_options=fingerprint,
        stats={"documents_read": state.docs_consumed, "empty_documents_skipped": state.empty_documents},
        dir=out,
    )
    keep = {s.file for st in manifest.splits.values() for s in st.shards}
    for f in out.iterdir():
        if SHARD_RE.match(f.name) and f.name not in keep:
            f.unlink()
    manifest.save(out)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest


def _print_summary(m: Manifest, seconds: float, resumed_from: int) -> None:
    tr, va = m.splits["train"], m.splits["val"]
    resumed = f" (resumed after {resumed_from} documents)" if resumed_from else ""
    print(
        f"nmoe-data: {m.dir}: {tr.documents + va.documents} documents -> train {tr.tokens:,} tokens "
        f"in {len(tr.shards)} shards, val {va.tokens:,} tokens in {len(va.shards)} shards, {m.dtype}, "
        f"vocab {m.vocab_size}; {seconds:.1f}s, {m.total_tokens / max(seconds, 1e-9) / 1e6:.2f}M tok/s{resumed}",
        flush=True,
    )
