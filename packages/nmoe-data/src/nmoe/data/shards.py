"""Shard files: `.npy` arrays of token ids written atomically and checked against the manifest."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from nmoe.data.errors import ShardCorruptError


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


def write_shard(directory: Path, split: str, index: int, tokens: np.ndarray):
    """Write one shard atomically; returns its ShardInfo (name, tokens, bytes, sha256)."""
    from nmoe.data.manifest import ShardInfo

    path = Path(directory) / shard_name(split, index)
    atomic_save_npy(path, tokens)
    return ShardInfo(path.name, int(tokens.size), path.stat().st_size, sha256_file(path))


def open_shard(directory: Path, info, dtype: str, *, verify: bool) -> np.ndarray:
    """Memory-map a shard after checking presence, dtype, size (and sha256 when `verify`)."""
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
    if verify and sha256_file(path) != info.sha256:
        raise ShardCorruptError(f"shard {path} fails its sha256 check (content changed); {fix}")
    return tokens
