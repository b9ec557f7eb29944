"""`manifest.json`: what a prepared dataset holds (source, tokenizer identity, shards with sha256)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nmoe.data.errors import DataError
from nmoe.data.shards import atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "nmoe.data.manifest/1"


@dataclass(frozen=True)
class ShardInfo:
    """One `.npy` shard: file name (relative to the dataset dir), token count, size and hash."""

    file: str
    tokens: int
    bytes: int
    sha256: str


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
        if d.get("format") != FORMAT:
            raise DataError(f"{directory}: manifest format {d.get('format')!r} is not {FORMAT!r}; re-run `nmoe-data prep`")
        d["splits"] = {
            k: SplitInfo(v["tokens"], v["documents"], tuple(ShardInfo(**s) for s in v["shards"]))
            for k, v in d["splits"].items()
        }
        return cls(**d, dir=directory)

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read `directory/manifest.json`; DataError naming the prep command when absent."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise DataError(f"{path} not found: {directory} is not a prepared dataset; run `uv run nmoe-data prep ...` first")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"), directory)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path} is unreadable ({e}); delete {directory} and re-run `nmoe-data prep`") from e
