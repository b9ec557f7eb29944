"""`prepare`: stream documents, tokenize them in worker processes, write shards + manifest.json.

Output layout of `dataset_dir(opts)` (= output/name):
  train_000000.npy ...  val_000000.npy ...   fixed-size uint16/uint32 shards, documents in stream
                                              order, each document preceded by the bos token
  tokenizer.json | tokenizer.tiktoken        copy of the tokenizer used
  manifest.json                              written last: its presence marks a finished prep
  .prep/                                     resume state while a prep is running
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from nmoe.data.errors import DataError
from nmoe.data.manifest import MANIFEST, Manifest, ShardInfo, SplitInfo
from nmoe.data.shards import atomic_save_npy, atomic_write_text, token_dtype, write_shard
from nmoe.data.sources import expand_glob, iter_file_documents, iter_hf_documents
from nmoe.data.tokenizer import Tokenizer

SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_TOKENS = 1_000_000
# With --val-tokens N, each document is a val candidate with this probability (by a hash of its
# index) until val holds N tokens, so val is spread over the stream instead of being its head.
VAL_TOKENS_RATE = 1 / 16
CHUNK_CHARS = 1 << 19  # characters of text sent to a worker per task
STATE_DIR = ".prep"
SHARD_RE = re.compile(r"^(train|val)_\d{6}\.npy$")


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class PrepOptions:
    """Everything `prepare` needs; the same options always produce byte-identical shards."""

    name: str
    output: str | Path
    tokenizer: str | Path
    source: str = "files"
    input: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_field: str = "text"
    tokenizer_vocab_size: int | None = None
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_tokens: int | None = None
    val_fraction: float | None = None
    workers: int | None = None
    max_docs: int | None = None

    def __post_init__(self):
        if self.source not in ("files", "hf"):
            raise DataError(f"source must be 'files' or 'hf', got {self.source!r}")
        if self.source == "files" and not self.input:
            raise DataError("source 'files' needs input, a glob such as 'corpus/*.jsonl.gz' (--input)")
        if self.source == "hf" and not self.dataset:
            raise DataError("source 'hf' needs dataset, e.g. 'HuggingFaceFW/fineweb-edu' (--dataset)")
        if not self.name or "/" in self.name:
            raise DataError(f"name must be a non-empty directory name, got {self.name!r}")
        if self.shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.val_tokens is not None and self.val_fraction is not None:
            raise DataError("give val_tokens or val_fraction, not both")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_tokens is not None and self.val_tokens < 0:
            raise DataError(f"val_tokens must be >= 0, got {self.val_tokens}")
        if self.workers is not None and self.workers < 1:
            raise DataError(f"workers must be >= 1, got {self.workers}")
        if self.max_docs is not None and self.max_docs < 0:
            raise DataError(f"max_docs must be >= 0, got {self.max_docs}")


def dataset_dir(opts: PrepOptions) -> Path:
    """Directory holding the shards and manifest.json: output/name."""
    return Path(opts.output) / opts.name


def _val_rule(opts: PrepOptions) -> dict:
    if opts.val_fraction is not None:
        return {"val_fraction": opts.val_fraction}
    return {"val_tokens": DEFAULT_VAL_TOKENS if opts.val_tokens is None else opts.val_tokens}


def _fingerprint(opts: PrepOptions, tok: Tokenizer) -> dict:
    """Everything that determines the shard bytes (not workers, output or paths of the tokenizer)."""
    src = {"source": opts.source, "text_field": opts.text_field}
    if opts.source == "files":
        src["input"] = str(opts.input)
    else:
        src.update(dataset=opts.dataset, dataset_config=opts.dataset_config, dataset_split=opts.dataset_split)
    return {**src, **_val_rule(opts), "shard_tokens": opts.shard_tokens, "max_docs": opts.max_docs,
            "tokenizer_sha256": tok.sha256}


def prep_command(opts: PrepOptions) -> str:
    """The `uv run nmoe-data prep ...` command line that prepares exactly `opts`."""
    args = ["uv", "run", "nmoe-data", "prep", "--source", opts.source]
    if opts.source == "files":
        args += ["--input", str(opts.input)]
    else:
        args += ["--dataset", opts.dataset]
        if opts.dataset_config:
            args += ["--dataset-config", opts.dataset_config]
        if opts.dataset_split != "train":
            args += ["--dataset-split", opts.dataset_split]
    args += ["--output", str(opts.output), "--name", opts.name, "--tokenizer", str(opts.tokenizer)]
    optional = [
        ("--text-field", opts.text_field, "text"),
        ("--tokenizer-vocab-size", opts.tokenizer_vocab_size, None),
        ("--shard-tokens", opts.shard_tokens, DEFAULT_SHARD_TOKENS),
        ("--val-tokens", opts.val_tokens, None),
        ("--val-fraction", opts.val_fraction, None),
        ("--workers", opts.workers, None),
        ("--max-docs", opts.max_docs, None),
    ]
    args += [a for flag, value, default in optional if value != default for a in (flag, str(value))]
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
            f"tokenizer {path} does not exist; pass --tokenizer-vocab-size N to train it from the input, "
            f"or run `uv run nmoe-data tokenizer train --input GLOB --vocab-size N --output {path}`"
        )
    if progress:
        print(f"nmoe-data: training a {opts.tokenizer_vocab_size}-token BPE tokenizer -> {path}", flush=True)
    t0 = time.perf_counter()
    docs = islice(iter_source_documents(opts), opts.max_docs)
    tok = Tokenizer.train(docs, opts.tokenizer_vocab_size, text_field=opts.text_field)
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
            print(f"nmoe-data: {len(damaged)} shard(s) of {out} missing or damaged ({', '.join(damaged[:3])}"
                  f"{', ...' if len(damaged) > 3 else ''}); preparing again", flush=True)
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
    manifest = _finish(opts, tok, out, state)
    if progress:
        _print_summary(manifest, time.perf_counter() - t0, resumed_from)
    return manifest


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
            pending = np.load(sdir / sd["pending"], allow_pickle=False).astype(dtype, copy=False)
            state.splits[split] = _SplitState(shards, sd["documents"], [pending], int(pending.size))
        if progress:
            print(f"nmoe-data: resuming {out} after {state.docs_consumed} documents", flush=True)
        return state


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
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(tok.kind, tok.to_str(), tok.bos_token)) as pool:
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
    bar = tqdm(total=opts.max_docs, initial=state.docs_consumed, unit="doc", disable=not progress,
               desc=f"prep {opts.name}", dynamic_ncols=True)
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
                    val_cap is None or state.splits["val"].tokens < val_cap)
                if _add(out, "val" if val else "train", state.splits["val" if val else "train"],
                        tokens[end - n:end], opts.shard_tokens):
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
        st.shards.append(write_shard(out, split, len(st.shards), buf[start:start + shard_tokens]))
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
    source = {k: fingerprint[k] for k in ("source", "input", "dataset", "dataset_config", "dataset_split")
              if k in fingerprint}
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
