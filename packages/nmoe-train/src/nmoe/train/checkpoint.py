"""Checkpoints: dense once, routed experts per expert-parallel rank; atomic, verified, re-shardable.

Layout of one checkpoint (`{root}/step_00001000/`):
  meta.json                step, run state, fingerprint (+ its items), world and expert-parallel size, every
                           rank's RNG states, loader cursor, git revision, the resolved config, the global
                           expert range of every expert file, the size and sha256 of every file, and
                           the sha256 of its own content (`meta_sha256`)
  dense.pt                 replicated (non-expert) parameters and buffers            (written by rank 0)
  dense_optim.pt           their optimizer state, keyed by parameter name           (written by rank 0)
  experts_ep{r}.pt         routed-expert tensors [E/P, ...] of expert-parallel rank r (written by rank r of
  experts_ep{r}_optim.pt   their optimizer state                                      the first replica)
`{root}/latest` names the newest complete checkpoint. Files are written into `.step_XXXXXXXX.tmp`, which
is renamed into place once every rank's files and meta.json are on disk; old checkpoints are renamed
aside before they are deleted. So a crash never leaves a half checkpoint, and a damaged or swapped file
is found by its checksum when the run resumes. Expert tensors are re-sharded by global expert index on
load, so a run resumes at another expert-parallel size.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nmoe.data import sha256_file
from nmoe.rdep.shm import process_gone

LATEST = "latest"
PREFIX = "step_"
LOCK = ".lock"
META = "meta.json"
META_SHA = "meta_sha256"  # meta.json's checksum of its own content (every key but this one)
DENSE, DENSE_OPTIM = "dense.pt", "dense_optim.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written; the message says why and what to do."""


class RunLocked(CheckpointError):
    """Another process is training this run (it holds the run's lock)."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def expert_file(ep_rank: int, optim: bool = False) -> str:
    return f"experts_ep{ep_rank}{'_optim' if optim else ''}.pt"


def _step_of(path: Path) -> int:
    """The step of a step_XXXXXXXX directory (numeric, so step 100000000 sorts after 99999999)."""
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return -1


def step_dirs(root: str | Path) -> list[Path]:
    """Checkpoint directories under root (complete or not), oldest step first."""
    return sorted((p for p in Path(root).glob(f"{PREFIX}*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)


# ---------------------------------------------------------------------------------------------- run lock
class RunLock:
    """An exclusive lock on a run's checkpoint folder: one trainer per run.

    `fcntl.flock` on `{root}/.lock`: the kernel releases it when the holder dies, so a crashed run never
    leaves a stale lock; the file records the holder's host and pid for the message.
    """

    def __init__(self, root: str | Path):
        self.path = Path(root) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _lock_holder(fd) if err.errno in (errno.EAGAIN, errno.EACCES) else ""
            os.close(fd)
            if not holder:
                raise
            raise RunLocked(
                f"{self.path.parent} is being trained right now by {holder}; two trainers on one run would "
                "overwrite each other's checkpoints and metrics. Wait for it or stop it, or give this run "
                "another runtime.run_name."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lock_holder(fd: int, wait_s: float = 2.0) -> str:
    """'pid P on HOST' of the lock's holder, or 'another process'.

    A new holder writes its line just after it takes the lock, over its predecessor's: while the file names
    nobody, or a process of this host that is gone, wait a moment for the line of the process holding it now.
    """
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        named = re.fullmatch(r"pid (\d+) on (\S+)", text)
        if named and (named[2] != socket.gethostname() or not process_gone(int(named[1]))):
            return text
        if time.monotonic() > deadline:
            return "another process"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------- helpers
def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete what a crash left under root (unfinished saves, checkpoints being pruned); at run start."""
    root = Path(root)
    stale = [p for p in root.glob(".*") if ".tmp" in p.name or ".old-" in p.name]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def git_revision(cwd: str | Path | None = None) -> str:
    """Short git revision of the working tree ('+dirty' if modified), or 'unknown'."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def capture_rng() -> str:
    """RNG states of python, numpy, torch and cuda, pickled and base64-encoded for meta.json."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return base64.b64encode(pickle.dumps(state)).decode()


def restore_rng(encoded: str) -> None:
    """Inverse of capture_rng."""
    state = pickle.loads(base64.b64decode(encoded))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    """fsync a file or a directory (its entries) so a rename that follows survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, obj: Any) -> dict[str, Any]:
    """torch.save `obj` to path, fsync it; {'bytes', 'sha256'}. OSError (with the cause) when it cannot."""
    try:
        torch.save(obj, path)
    except RuntimeError as err:  # torch's stream writer reports a full disk as a RuntimeError
        free = shutil.disk_usage(path.parent).free
        reason = "no space left on device" if free < (64 << 20) else str(err).splitlines()[0]
        raise OSError(errno.ENOSPC if free < (64 << 20) else errno.EIO, reason) from None
    _fsync(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------- state split
@dataclass(frozen=True)
class Shard:
    """Which part of the model this rank saves and loads."""

    is_expert: Callable[[str], bool]  # parameter/buffer name -> routed-expert tensor (leading dim = local experts)
    ep_rank: int = 0
    ep_size: int = 1
    n_experts: int = 0  # routed experts in the whole model (E); each rank holds E / ep_size

    @property
    def expert_range(self) -> tuple[int, int]:
        """[first, end) global indices of this rank's experts."""
        per = self.n_experts // self.ep_size if self.n_experts else 0
        return self.ep_rank * per, (self.ep_rank + 1) * per


def _split(named: Mapping[str, Any], is_expert: Callable[[str], bool]) -> tuple[dict, dict]:
    dense = {n: t for n, t in named.items() if not is_expert(n)}
    return dense, {n: t for n, t in named.items() if is_expert(n)}


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """Per-parameter optimizer state keyed by parameter name (CPU copies)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()}
        for p, state in optimizer.state.items()
    }


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of parameters holding NaN or Inf (one host sync)."""
    params = list(model.named_parameters())
    if not params:
        return []
    flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]).cpu().tolist()
    return [name for (name, _), ok in zip(params, flags) if not ok]


# ---------------------------------------------------------------------------------------------- save
def write_shard_files(
    tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, shard: Shard, writes_dense: bool
) -> dict[str, dict[str, Any]]:
    """Write this rank's files of a checkpoint into `tmp`; {file: {bytes, sha256, experts?}}."""
    tensors = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    dense, experts = _split(tensors, shard.is_expert)
    opt_dense, opt_experts = _split(optimizer_state_by_name(model, optimizer), shard.is_expert)
    files: dict[str, dict[str, Any]] = {}
    if writes_dense:
        files[DENSE] = _write_file(tmp / DENSE, dense)
        files[DENSE_OPTIM] = _write_file(tmp / DENSE_OPTIM, opt_dense)
    if experts:
        first, end = shard.expert_range
        for optim, payload in ((False, experts), (True, opt_experts)):
            name = expert_file(shard.ep_rank, optim)
            files[name] = dict(_write_file(tmp / name, payload), experts=[first, end])
    return files


def _meta_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of a meta.json mapping as read back from JSON, leaving out its own checksum."""
    body = json.dumps({k: v for k, v in meta.items() if k != META_SHA}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def publish(root: Path, tmp: Path, step: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Write meta.json into tmp, rename tmp to step_XXXXXXXX, point `latest` at it, prune; returns the dir."""
    meta = json.loads(json.dumps(dict(meta, step=step, saved_at=time.time())))  # as it will be read back
    meta[META_SHA] = _meta_digest(meta)
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    _fsync(tmp / META)
    _fsync(tmp)
    final = root / step_dir_name(step)
    _replace_dir(tmp, final)
    _write_latest(root, final.name)
    prune(root, keep_last, final)
    return final


def temporary_dir(root: Path, step: int) -> Path:
    """The (empty) folder a save of `step` writes into."""
    tmp = root / f".{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing final is moved aside first and only deleted once tmp is in place."""
    aside = final.with_name(f".{final.name}.old-{os.getpid()}")
    replacing = final.exists()
    if replacing:
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync(final.parent)
    if replacing:
        shutil.rmtree(aside, ignore_errors=True)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync(tmp)
    os.replace(tmp, root / LATEST)
    _fsync(root)


def prune(root: Path, keep_last: int, newest: Path) -> None:
    """Keep `newest` and the keep_last - 1 checkpoints before it; each older one is renamed aside, then deleted.

    Checkpoints of later steps (left by a run rolled back with checkpoint.resume = PATH) are not touched;
    this run overwrites them as it reaches their steps.
    """
    older = [p for p in step_dirs(root) if _step_of(p) < _step_of(newest)]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        aside = old.with_name(f".{old.name}.old-{os.getpid()}")
        os.rename(old, aside)  # a kill from here on leaves a dot-folder, removed at the next start
        shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- find & verify
def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of the checkpoint at path; CheckpointError saying what is wrong if it is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Set checkpoint.resume to an existing step_XXXXXXXX "
            "directory, to 'auto' (continue this run's latest) or to 'never'."
        )
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint (no meta.json). Point checkpoint.resume at a step_XXXXXXXX directory, "
            "or use 'auto'."
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_file} is damaged (not valid JSON: {err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} is damaged (a JSON {type(meta).__name__}, not an object)")
    # A change that leaves valid JSON (a flipped digit, an RNG state) would otherwise resume silently wrong.
    if META_SHA in meta and meta[META_SHA] != _meta_digest(meta):
        raise CheckpointError(f"{meta_file} fails its checksum (its content changed since it was written)")
    return meta


def candidates(root: str | Path) -> list[Path]:
    """Checkpoint folders under root, the one `latest` names first, then newest step first.

    Folders without meta.json are included: a save publishes meta.json with its folder, so one without it
    is damaged, and resume must say so rather than pass over it in silence.
    """
    root = Path(root)
    done = list(reversed(step_dirs(root)))
    pointer = root / LATEST
    if pointer.is_file():  # a hint only: a damaged pointer names nothing, and the newest step comes first
        named = root / pointer.read_text(errors="replace").strip()
        if named in done:
            done.remove(named)
            done.insert(0, named)
    return done


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root (not verified), or None."""
    found = [p for p in candidates(root) if (p / META).is_file()]
    return found[0] if found else None


def files_to_check(meta: Mapping[str, Any]) -> list[str]:
    """Every file a checkpoint's meta lists (older checkpoints without checksums list none)."""
    return sorted(meta.get("files", {}))


def verify_files(path: Path, meta: Mapping[str, Any], names: Iterable[str]) -> str | None:
    """Check size and sha256 of `names` against meta; the first problem as text, or None."""
    recorded = meta.get("files", {})
    for name in names:
        f = path / name
        want = recorded[name]
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, meta.json recorded {want['bytes']} (truncated or replaced)"
        if sha256_file(f) != want["sha256"]:
            return f"{name} fails its sha256 check (its content changed since it was written)"
    return None


def check_compatible(meta: Mapping[str, Any], fingerprint: str, items: Mapping[str, Any], path: Path) -> None:
    """Refuse a checkpoint of another config, naming each key that differs."""
    if meta.get("fingerprint") == fingerprint:
        return
    saved = meta.get("fingerprint_items", {})
    keys = sorted(set(saved) | set(items))
    diffs = [
        f"{k}: checkpoint {saved.get(k, '<absent>')!r}, this run {items.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, "<absent>") != items.get(k, "<absent>")
    ] or ["config fingerprint differs"]
    listing = "\n  ".join(diffs)
    raise CheckpointError(
        f"checkpoint {path} does not match this run:\n  {listing}\n"
        "Resume with the config it was written with, or start a fresh run: set checkpoint.resume = 'never' "
        "with another runtime.run_name or checkpoint.dir."
    )


# ---------------------------------------------------------------------------------------------- load
def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read ({str(err).splitlines()[0]})") from None


def _expert_slices(path: Path, meta: Mapping[str, Any], shard: Shard, optim: bool) -> dict[str, Any]:
    """This rank's expert tensors (or their optimizer state), cut by global expert index from the saved shards."""
    want_first, want_end = shard.expert_range
    pieces: list[tuple[int, dict]] = []
    for name, info in sorted(meta.get("files", {}).items()):
        if "experts" not in info or name.endswith("_optim.pt") != optim:
            continue
        first, end = info["experts"]
        lo, hi = max(first, want_first), min(end, want_end)
        if lo < hi:
            pieces.append((first, _slice_experts(_torch_load(path / name), lo - first, hi - first)))
    if not pieces and want_end > want_first:
        raise CheckpointError(f"checkpoint {path} holds no expert file covering experts [{want_first}, {want_end})")
    return _concat_experts([p for _, p in sorted(pieces, key=lambda x: x[0])])


def _slice_experts(obj: Any, lo: int, hi: int) -> Any:
    if torch.is_tensor(obj):
        return obj[lo:hi] if obj.dim() > 0 else obj
    if isinstance(obj, dict):
        return {k: _slice_experts(v, lo, hi) for k, v in obj.items()}
    return obj


def _concat_experts(parts: list[Any]) -> Any:
    first = parts[0] if parts else {}
    if torch.is_tensor(first):
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, dict):
        return {k: _concat_experts([p[k] for p in parts]) for k in first}
    return first


def load_shard(
    path: Path, meta: Mapping[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, shard: Shard
) -> None:
    """Load weights, buffers and (optionally) optimizer state of this rank in place, re-sharding experts."""
    state = dict(_torch_load(path / DENSE))
    if any(shard.is_expert(n) for n in model.state_dict()):
        state.update(_expert_slices(path, meta, shard, optim=False))
    expected = model.state_dict()
    if set(state) != set(expected):
        raise CheckpointError(
            f"checkpoint {path} holds other tensors than this model: missing {sorted(set(expected) - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - set(expected))[:5]}"
        )
    wrong = [n for n, t in state.items() if tuple(t.shape) != tuple(expected[n].shape)]
    if wrong:
        raise CheckpointError(
            f"checkpoint {path}: tensor shapes differ from this model for {wrong[:5]} (e.g. {tuple(state[wrong[0]].shape)}"
            f" vs {tuple(expected[wrong[0]].shape)}): it was written for another model shape"
        )
    model.load_state_dict(state, strict=True)
    if optimizer is not None:
        by_name = dict(_torch_load(path / DENSE_OPTIM))
        if any(shard.is_expert(n) for n, _ in model.named_parameters()):
            by_name.update(_expert_slices(path, meta, shard, optim=True))
        load_optimizer_by_name(model, optimizer, by_name)


def load_optimizer_by_name(model, optimizer, by_name: Mapping[str, dict]) -> None:
    """Per-parameter state (moments, step counts) from the checkpoint; group settings stay this run's.

    The hyperparameters are fingerprinted (so equal) and lr is set every step, while the kernel
    choice (fused / foreach) belongs to this run's device, not to the one that wrote the checkpoint.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    state, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name in by_name:
                state[index] = by_name[name]
            index += 1
    groups, start = [], 0
    for group in optimizer.param_groups:
        current = {k: v for k, v in group.items() if k != "params"}
        groups.append(dict(current, params=list(range(start, start + len(group["params"])))))
        start += len(group["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
