"""Checkpoints: split dense / per-expert-parallel-rank layout, atomic writes, bitwise resume.

Layout of one checkpoint (`{root}/step_00001000/`):
  meta.json                step, fingerprint (+ its items), world size, RNG states, loader cursor,
                           tokens seen, git revision, run id
  dense.pt                 replicated (non-expert) parameters and buffers
  dense_optim.pt           optimizer state of the dense parameters, keyed by parameter name
  experts_ep{r}.pt         routed-expert parameters owned by expert-parallel rank r
  experts_ep{r}_optim.pt   their optimizer state
`{root}/latest` holds the name of the newest complete checkpoint. Everything is written into a
temporary directory that is renamed into place, so a crash never leaves a half checkpoint; the
temporaries a crash leaves behind are removed when the next run on that root starts.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _step_of(path: Path) -> int:
    """The step of a step_XXXXXXXX directory (numeric, so step 100000000 sorts after 99999999)."""
    try:
        return int(path.name[len(PREFIX) :])
    except ValueError:
        return -1


def _step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under root (complete or not), oldest step first."""
    return sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete the temporary dirs/files a crashed save left under root; call once when a run starts."""
    root = Path(root)
    stale = [p for p in root.glob(".*") if ".tmp-" in p.name or ".old-" in p.name]
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


def capture_rng() -> dict[str, str]:
    """RNG states of python, numpy, torch and cuda, base64-encoded for meta.json."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return {k: base64.b64encode(pickle.dumps(v)).decode() for k, v in state.items()}


def restore_rng(encoded: Mapping[str, str]) -> None:
    state = {k: pickle.loads(base64.b64decode(v)) for k, v in encoded.items()}
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _split(named: Mapping[str, torch.Tensor], is_expert: Callable[[str], bool]):
    dense = {n: t for n, t in named.items() if not is_expert(n)}
    experts = {n: t for n, t in named.items() if is_expert(n)}
    return dense, experts


def _optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, state in optimizer.state.items():
        out[names[id(p)]] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()}
    return out


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    *,
    is_expert: Callable[[str], bool],
    keep_last: int,
    ep_rank: int = 0,
) -> Path:
    """Write checkpoint `step` atomically under root, update `latest`, prune to keep_last."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_files(tmp, step, model, optimizer, meta, is_expert, ep_rank)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, final)
    _write_latest(root, final.name)
    _prune(root, keep_last, final)
    return final


def _write_files(tmp: Path, step: int, model, optimizer, meta, is_expert, ep_rank: int) -> None:
    tensors = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    dense, experts = _split(tensors, is_expert)
    opt_dense, opt_experts = _split(_optimizer_state_by_name(model, optimizer), is_expert)
    torch.save(dense, tmp / "dense.pt")
    torch.save(opt_dense, tmp / "dense_optim.pt")
    torch.save(experts, tmp / f"experts_ep{ep_rank}.pt")
    torch.save(opt_experts, tmp / f"experts_ep{ep_rank}_optim.pt")
    full_meta = dict(
        meta,
        step=step,
        saved_at=time.time(),
        param_groups=[{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
    )
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, sort_keys=True))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)


def _fsync(path: Path) -> None:
    """fsync a file or a directory (its entries) so a rename that follows survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing final is moved aside first and only deleted once tmp is in place."""
    aside = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync(tmp)
    os.replace(tmp, root / LATEST)
    _fsync(root)


def _prune(root: Path, keep_last: int, newest: Path) -> None:
    """Keep `newest` (what `latest` names) and the keep_last - 1 checkpoints before it; delete older ones.

    Checkpoints of later steps (left by a run that this one rolled back from, via checkpoint.resume =
    PATH) are not touched here; this run overwrites them as it reaches their steps.
    """
    older = [p for p in _step_dirs(root) if _step_of(p) < _step_of(newest)]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "meta.json").is_file():
            return candidate
    done = [p for p in _step_dirs(root) if (p / "meta.json").is_file()]
    return done[-1] if done else None


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of the checkpoint at path; CheckpointError saying what is wrong if it is not one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Set checkpoint.resume to an existing step_XXXXXXXX "
            "directory, to 'auto' (continue this run's latest) or to 'never'."
        )
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint (no meta.json). Point checkpoint.resume at a step_XXXXXXXX directory, or use 'auto'."
        )
    return json.loads(meta_file.read_text())


def check_compatible(
    meta: Mapping[str, Any], fingerprint: str, items: Mapping[str, Any], world_size: int, path: Path
) -> None:
    """Refuse a checkpoint from another config or world size, naming what differs."""
    problems = []
    if meta.get("world_size") != world_size:
        problems.append(f"world size: checkpoint {meta.get('world_size')}, this run {world_size}")
    if meta.get("fingerprint") != fingerprint:
        saved = meta.get("fingerprint_items", {})
        keys = sorted(set(saved) | set(items))
        diffs = [
            f"{k}: checkpoint {saved.get(k, '<absent>')!r}, this run {items.get(k, '<absent>')!r}"
            for k in keys
            if saved.get(k, "<absent>") != items.get(k, "<absent>")
        ]
        problems.extend(diffs or ["config fingerprint differs"])
    if problems:
        listing = "\n  ".join(problems)
        raise CheckpointError(
            f"checkpoint {path} does not match this run:\n  {listing}\n"
            "Resume with the config it was written with, or start a fresh run: set checkpoint.resume = 'never' "
            "with another runtime.run_name or checkpoint.dir."
        )


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, ep_rank: int = 0
) -> dict[str, Any]:
    """Load weights, buffers and optimizer state in place; return meta (RNG not yet restored)."""
    path = Path(path)
    meta = read_meta(path)
    files = ["dense.pt", "dense_optim.pt", f"experts_ep{ep_rank}.pt", f"experts_ep{ep_rank}_optim.pt"]
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: missing {', '.join(missing)}. Resume from an earlier step (set checkpoint.resume to its path)."
        )
    state = {**torch.load(path / "dense.pt", weights_only=True), **torch.load(path / files[2], weights_only=True)}
    expected = set(model.state_dict())
    if set(state) != expected:
        raise CheckpointError(
            f"checkpoint {path} holds other tensors than this model: missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
        )
    model.load_state_dict(state, strict=True)
    opt_by_name = {
        **torch.load(path / "dense_optim.pt", weights_only=True),
        **torch.load(path / files[3], weights_only=True),
    }
    _load_optimizer_by_name(model, optimizer, opt_by_name)
    return meta


def _load_optimizer_by_name(model, optimizer, by_name: Mapping[str, dict]) -> None:
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
