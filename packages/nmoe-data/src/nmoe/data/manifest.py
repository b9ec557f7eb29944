"""`manifest.json`: what a prepared dataset holds (source, tokenizer identity, shards with sha256)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nmoe.data.errors import DataError, TokenizerMismatchError
from nmoe.data.shards import ShardInfo, atomic_write_text

MANIFEST = "manifest.json"
# Format 2 records each shard's largest token id (`max_id`); format 1 (datasets prepared before) is still
# read, with max_id unknown (None).
FORMAT = "nmoe.data.manifest/2"
FORMAT_1 = "nmoe.data.manifest/1"

__all__ = ["FORMAT", "MANIFEST", "Manifest", "ShardInfo", "SplitInfo", "check_tokenizers"]


@dataclass(frozen=True)
class SplitInfo:
    """All shards of one split (`train` or `val`), in stream order."""

    tokens: int = 0
    documents: int = 0
    shards: tuple[ShardInfo, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset; `dir` is where it was loaded from (not serialized)."""

    name: str
    source: dict
    tokenizer: dict
    vocab_size: int
    bos_id: int
    dtype: str
    shard_tokens: int
    splits: dict[str, SplitInfo]
    prep_options: dict
    stats: dict = field(default_factory=dict)
    format: str = FORMAT
    dir: Path | None = field(default=None, compare=False)

    @property
    def total_tokens(self) -> int:
        """Tokens over all splits."""
        return sum(s.tokens for s in self.splits.values())

    def split(self, name: str) -> SplitInfo:
        """The split `name`; DataError when the dataset has no such split."""
        if name not in self.splits:
            raise DataError(f"dataset {self.dir} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, no timestamps)."""
        d = asdict(self)
        d.pop("dir")
        for split in d["splits"].values():
            for shard in split["shards"]:
                if shard["max_id"] is None:  # a format-1 manifest: keep its text (and sha256) as it was
                    del shard["max_id"]
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @property
    def sha256(self) -> str:
        """Hash of the manifest content: changes whenever any shard or option changes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write `directory/manifest.json` atomically."""
        path = Path(directory) / MANIFEST
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def from_json(cls, text: str, directory: Path | None = None) -> Manifest:
        """Parse manifest JSON text."""
        d = json.loads(text)
        if d.get("format") not in (FORMAT, FORMAT_1):
            raise DataError(
                f"{directory}: manifest format {d.get('format')!r} is not {FORMAT!r} (or {FORMAT_1!r}); "
                "re-run `nmoe-data prep` with this nmoe-data, or upgrade nmoe-data"
            )
        d["splits"] = {
            k: SplitInfo(v["tokens"], v["documents"], tuple(_shard_info(s, d["format"]) for s in v["shards"]))
            for k, v in d["splits"].items()
        }
        return cls(**d, dir=directory)

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read `directory/manifest.json`; DataError naming the prep command when absent."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise DataError(
                f"{path} not found: {directory} is not a prepared dataset; run `uv run nmoe-data prep ...` first"
            )
        try:
            return cls.from_json(path.read_text(encoding="utf-8"), directory)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path} is unreadable ({e}); delete {directory} and re-run `nmoe-data prep`") from e


def _shard_info(d: dict, fmt: str) -> ShardInfo:
    if fmt == FORMAT_1:
        return ShardInfo(d["file"], d["tokens"], d["bytes"], d["sha256"])
    return ShardInfo(d["file"], d["tokens"], d["bytes"], d["sha256"], d["max_id"])


def check_tokenizers(manifests: list[Manifest], expect_sha: str | None, expect_vocab: int | None) -> None:
    """TokenizerMismatchError unless every manifest has the same tokenizer (and the expected sha256 / vocab)."""
    first = manifests[0]
    for m in manifests:
        if m.tokenizer["sha256"] != first.tokenizer["sha256"] or m.vocab_size != first.vocab_size:
            raise TokenizerMismatchError(
                f"mixture datasets {first.dir} and {m.dir} were tokenized differently "
                f"(sha256 {first.tokenizer['sha256'][:12]} vs {m.tokenizer['sha256'][:12]}); "
                "prep every dataset of a mixture with the same --tokenizer"
            )
        if expect_sha is not None and m.tokenizer["sha256"] != expect_sha:
            raise TokenizerMismatchError(
                f"{m.dir} was tokenized with tokenizer sha256 {m.tokenizer['sha256'][:12]}, but the config's "
                f"tokenizer has {expect_sha[:12]}; point the config at {m.dir / m.tokenizer['file']} or "
                "re-prep the data with the config's tokenizer (new --name)"
            )
        if expect_vocab is not None and m.vocab_size != expect_vocab:
            raise TokenizerMismatchError(
                f"{m.dir} has vocab size {m.vocab_size} but {expect_vocab} was expected; "
                f"set the model vocab size to {m.vocab_size} or re-prep with a matching tokenizer"
            )
