"""Byte-level BPE tokenizer: trained with Hugging Face `tokenizers`, or loaded from a
`tokenizer.json` or a tiktoken rank file. One special token separates documents (`bos_id`)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from nmoe.data.errors import DataError

BOS_TOKEN = "<|bos|>"
# Separator tokens recognised when loading a tokenizer trained elsewhere, in order of preference.
KNOWN_SEPARATORS = (BOS_TOKEN, "<|endoftext|>", "<|begin_of_text|>", "<s>", "</s>")
# GPT-4 (cl100k) pre-tokenisation pattern: splits text into words, numbers of <= 3 digits,
# punctuation runs and whitespace before BPE merges are learned inside each piece.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# Training reads a deterministic sample: the stream's documents in order, each cut to
# DOC_CHARS characters, until MAX_TRAIN_CHARS characters have been read.
MAX_TRAIN_CHARS = 1_000_000_000
DOC_CHARS = 10_000


class Tokenizer:
    """A byte-level BPE tokenizer with a document separator token (`bos_id`)."""

    def __init__(self, kind: str, serialized: str, bos_token: str | None = None):
        """Build from `to_str()` output; use `load` or `train` instead of calling this directly."""
        self.kind = kind
        self._serialized = serialized
        if kind == "hf":
            self._init_hf(serialized, bos_token)
        elif kind == "tiktoken":
            self._init_tiktoken(serialized, bos_token)
        else:
            raise DataError(f"unknown tokenizer kind {kind!r}; expected 'hf' or 'tiktoken'")

    # ---------- construction ----------
    def _init_hf(self, serialized: str, bos_token: str | None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._hf = HFTokenizer.from_str(serialized)
        self._hf.encode_special_tokens = True  # literal "<|bos|>" in a document is plain text
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos_token or _find_separator(self._hf.token_to_id)
        bos_id = self._hf.token_to_id(self.bos_token)
        if bos_id is None:
            raise DataError(f"tokenizer has no token {self.bos_token!r}; add it as a special token")
        self.bos_id = bos_id
        canonical = json.dumps(json.loads(serialized), sort_keys=True, separators=(",", ":"))
        self._sha256 = hashlib.sha256(canonical.encode()).hexdigest()

    def _init_tiktoken(self, serialized: str, bos_token: str | None) -> None:
        import tiktoken

        ranks = _parse_tiktoken_ranks(serialized)
        self.bos_token = bos_token or BOS_TOKEN
        self.bos_id = max(ranks.values()) + 1
        self.vocab_size = self.bos_id + 1
        self._tt = tiktoken.Encoding(
            name="nmoe-tiktoken",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={self.bos_token: self.bos_id},
        )
        canonical = "\n".join(
            ["tiktoken", SPLIT_PATTERN, self.bos_token]
            + [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
        )
        self._sha256 = hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` (HF `tokenizers`) or a tiktoken rank file (`base64 rank` lines)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer file {path} does not exist; train one with "
                f"`uv run nmoe-data tokenizer train --input GLOB --vocab-size N --output {path}`"
            )
        text = path.read_text(encoding="utf-8")
        kind = "hf" if text.lstrip().startswith("{") else "tiktoken"
        try:
            return cls(kind, text)
        except DataError:
            raise
        except Exception as e:  # tokenizers/tiktoken raise plain Exception subclasses on bad files
            raise DataError(f"cannot read tokenizer {path} as {kind}: {e}") from e

    @classmethod
    def train(
        cls,
        files_or_texts: str | Sequence[os.PathLike] | Iterable[str],
        vocab_size: int,
        *,
        text_field: str = "text",
        max_chars: int = MAX_TRAIN_CHARS,
        doc_chars: int = DOC_CHARS,
        bos_token: str = BOS_TOKEN,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train a byte-level BPE of `vocab_size` tokens (incl. `bos_token`) on a deterministic sample.

        `files_or_texts` is a glob string, a list of `Path`s (.txt/.jsonl/.jsonl.gz/.parquet), or
        an iterable of document strings. The sample is the documents in order, each cut to
        `doc_chars` characters, until `max_chars` characters were read.
        """
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        if vocab_size < 257:
            raise DataError(
                f"vocab_size {vocab_size} is too small; byte-level BPE needs at least 257 (256 bytes + bos)"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[bos_token],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        chars = [0]
        sample = _training_sample(_documents(files_or_texts, text_field), max_chars, doc_chars, chars)
        hf.train_from_iterator(sample, trainer)
        if chars[0] == 0 or hf.get_vocab_size() < 257:
            raise DataError(
                "tokenizer training saw no text: there are no documents, or all are empty; "
                "check the input (--input) and the text field (--text-field)"
            )
        hf.encode_special_tokens = True
        return cls("hf", hf.to_str(), bos_token)

    # ---------- use ----------
    def to_str(self) -> str:
        """The serialized tokenizer (tokenizer.json text or tiktoken rank lines)."""
        return self._serialized

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to `path` atomically (tokenizer.json, or a tiktoken rank file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self._serialized, encoding="utf-8")
        os.replace(tmp, path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special-token strings in the text are encoded as plain text)."""
        if self.kind == "hf":
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._tt.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, in order (may use several threads)."""
        if self.kind == "hf":
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return self._tt.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the separator decodes to its token string."""
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._tt.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def sha256(self) -> str:
        """Hash of the canonical serialization: equal hashes mean identical tokenization."""
        return self._sha256

    @property
    def identity(self) -> dict:
        """JSON-serialisable identity recorded in every manifest."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "bos_token": self.bos_token,
            "bos_id": self.bos_id,
            "sha256": self._sha256,
        }

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, sha256={self._sha256[:12]})"


def _find_separator(token_to_id) -> str:
    for token in KNOWN_SEPARATORS:
        if token_to_id(token) is not None:
            return token
    raise DataError(
        f"tokenizer has none of the document separator tokens {KNOWN_SEPARATORS}; "
        f"add {BOS_TOKEN!r} as a special token or train one with `nmoe-data tokenizer train`"
    )


def _parse_tiktoken_ranks(text: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception as e:
            raise DataError(f"tiktoken rank file line {lineno} is not `base64 rank`: {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError("tiktoken ranks must be 0..N-1 without gaps or repeats")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(
            f"tiktoken rank file lacks {len(missing)} single bytes (e.g. {missing[:4]}); it is not byte-level"
        )
    return ranks


def _documents(files_or_texts, text_field: str) -> Iterator[str]:
    from nmoe.data.sources import expand_glob, iter_file_documents

    if isinstance(files_or_texts, str):
        yield from iter_file_documents(expand_glob(files_or_texts), text_field)
        return
    items = list(files_or_texts) if isinstance(files_or_texts, Sequence) else files_or_texts
    if isinstance(items, list) and items and all(isinstance(p, os.PathLike) for p in items):
        yield from iter_file_documents([Path(p) for p in items], text_field)
        return
    for text in items:
        if not isinstance(text, str):
            raise DataError(f"Tokenizer.train expects document strings or Paths, got {type(text).__name__}")
        yield text


def _training_sample(docs: Iterable[str], max_chars: int, doc_chars: int, chars: list[int]) -> Iterator[str]:
    """Each document cut to doc_chars, until max_chars; chars[0] counts the characters yielded."""
    for text in docs:
        if chars[0] >= max_chars:
            return
        piece = text[: min(doc_chars, max_chars - chars[0])]
        chars[0] += len(piece)
        yield piece
