"""Shard files: `.npy` arrays of token ids written atomically and checked against the manifest."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nmoe.data.errors import ShardCorruptError


@dataclass(frozen=True)
class ShardInfo:
    """One `.npy` shard: file name (relative to the dataset dir), token count, size, hash and largest token id.

    `max_id` is None for shards of a dataset prepared before manifest format 2 (unknown).
    """

    file: str
    tokens: int
    bytes: int
    sha256: str
    max_id: int | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`, e.g. `train_000003.npy`."""
    return f"{split}_{index:06d}.npy"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file + rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save `array` to `path` via a temp file + rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def scan_shard(path: Path, tokens: np.ndarray, chunk: int = 1 << 22) -> tuple[str, int]:
    """sha256 of a shard file's bytes and its largest token id (-1 when empty), in one read of the file.

    `tokens` is the file's memory map (np.load(mmap_mode="r")); its `offset` is where the data starts.
    """
    h = hashlib.sha256()
    itemsize, max_id, header_left, rest = tokens.dtype.itemsize, -1, tokens.offset, b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            skip = min(header_left, len(block))
            header_left -= skip
            data = rest + block[skip:]
            whole = len(data) // itemsize * itemsize  # an id may straddle two blocks
            if whole:
                max_id = max(max_id, int(np.frombuffer(data[:whole], dtype=tokens.dtype).max()))
            rest = data[whole:]
    return h.hexdigest(), max_id


def write_shard(directory: Path, split: str, index: int, tokens: np.ndarray) -> ShardInfo:
    """Write one shard atomically; returns its ShardInfo (name, tokens, bytes, sha256, max id)."""
    path = Path(directory) / shard_name(split, index)
    atomic_save_npy(path, tokens)
    max_id = int(tokens.max()) if tokens.size else -1
    return ShardInfo(path.name, int(tokens.size), path.stat().st_size, sha256_file(path), max_id)


def open_shard(directory: Path, info: ShardInfo, dtype: str, *, verify: bool) -> tuple[np.ndarray, int | None]:
    """Memory-map a shard after checking presence, dtype, size (and sha256 when `verify`).

    Returns the tokens and the shard's largest token id: `info.max_id`, or, when the manifest does
    not record it (format 1), the id found during the sha256 pass when `verify`, else None (unchecked).
    """
    path = Path(directory) / info.file
    fix = f"delete {path} and re-run the same `nmoe-data prep` command to rewrite it"
    if not path.is_file():
        raise ShardCorruptError(f"shard {path} is missing; {fix}")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ShardCorruptError(f"shard {path} is not a readable .npy file ({e}); {fix}") from e
    if tokens.dtype != np.dtype(dtype) or tokens.ndim != 1:
        raise ShardCorruptError(
            f"shard {path} holds {tokens.dtype}[{tokens.ndim}d] but the manifest says {dtype}[1d]; {fix}"
        )
    size = path.stat().st_size
    if size != info.bytes or tokens.size != info.tokens:
        raise ShardCorruptError(
            f"shard {path} has {size} bytes / {tokens.size} tokens, manifest says {info.bytes} / {info.tokens}; {fix}"
        )
    max_id = info.max_id
    if verify:
        if max_id is None:
            digest, max_id = scan_shard(path, tokens)
        else:
            digest = sha256_file(path)
        if digest != info.sha256:
            raise ShardCorruptError(f"shard {path} fails its sha256 check (content changed); {fix}")
    return tokens, max_id
