"""What a config means on this machine and world: device, precision and the parallel layout.

One owner for these decisions: `plan_run` is called by the trainer and by `nmoe-train --dry-run`,
so both agree on the device, the autocast dtype (and the activation bytes it implies), the
expert-parallel layout, the micro-batch, the gradient accumulation and the tokens per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nmoe.train.config import Config


class SetupError(RuntimeError):
    """The run cannot start as configured on this machine or world; the message says what to change."""


@dataclass(frozen=True)
class RunPlan:
    """The resolved runtime of a config: identical on every rank."""

    device_type: str  # "cpu" | "cuda"
    amp_dtype: torch.dtype | None  # autocast dtype, None: full fp32
    world_size: int
    ep_size: int  # ranks sharing one copy of the routed experts
    micro_batch: int  # sequences per forward pass per rank
    grad_accum: int  # micro-batches per optimizer step per rank
    seq_len: int

    @property
    def precision(self) -> str:
        """'bf16' (autocast) or 'fp32'."""
        return "fp32" if self.amp_dtype is None else "bf16"

    @property
    def act_bytes(self) -> int:
        """Bytes per element of the saved activations under this precision."""
        return 4 if self.amp_dtype is None else 2

    @property
    def replicas(self) -> int:
        """Copies of the routed experts (expert-data-parallel size)."""
        return self.world_size // self.ep_size

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all ranks."""
        return self.global_batch * self.seq_len


def world_size_from_env(environ=os.environ) -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return int(environ.get("WORLD_SIZE", "1"))


def resolve_device_type(cfg: Config, cuda_available: bool) -> str:
    """'cuda' or 'cpu' from runtime.device; SetupError for cuda without a GPU."""
    want = cfg.runtime.device
    if want == "cuda" and not cuda_available:
        raise SetupError(
            "runtime.device = 'cuda' but no CUDA GPU is visible. Set runtime.device = 'cpu' (or 'auto') "
            "or run on a GPU machine."
        )
    return "cuda" if want == "cuda" or (want == "auto" and cuda_available) else "cpu"


def resolve_amp_dtype(cfg: Config, device_type: str) -> torch.dtype | None:
    """The autocast dtype of runtime.dtype on this device: bf16, or None for full fp32 (auto on CPU)."""
    mode = cfg.runtime.dtype
    if mode == "fp32" or (mode == "auto" and device_type == "cpu"):
        return None
    return torch.bfloat16


def plan_run(cfg: Config, world_size: int = 1, cuda_available: bool | None = None) -> RunPlan:
    """Resolve device, precision and layout for `world_size` ranks; SetupError naming the key on a mismatch."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    device_type = resolve_device_type(cfg, cuda_available)
    ep_size = _expert_parallel_size(cfg, world_size)
    micro, accum = _micro_batching(cfg, world_size)
    return RunPlan(
        device_type=device_type,
        amp_dtype=resolve_amp_dtype(cfg, device_type),
        world_size=world_size,
        ep_size=ep_size,
        micro_batch=micro,
        grad_accum=accum,
        seq_len=cfg.train.seq_len,
    )


def _expert_parallel_size(cfg: Config, world_size: int) -> int:
    ep = cfg.parallel.ep_size or world_size
    experts = cfg.model.n_routed_experts if cfg.model.has_moe else None
    if ep > world_size or world_size % ep:
        raise SetupError(
            f"parallel.ep_size = {ep} does not divide the world size {world_size}: set parallel.ep_size to a "
            f"divisor of {world_size} (0 means the world size), or launch with a multiple of {ep} processes."
        )
    if experts is not None and experts % ep:
        raise SetupError(
            f"model.n_routed_experts = {experts} is not divisible by the expert-parallel size {ep}"
            f"{' (the world size)' if not cfg.parallel.ep_size else ''}: each rank must own the same number of "
            f"experts. Launch with a world size that divides {experts}, or set parallel.ep_size to such a divisor."
        )
    return ep


def _micro_batching(cfg: Config, world_size: int) -> tuple[int, int]:
    global_batch = cfg.train.global_batch_size
    if global_batch % world_size:
        raise SetupError(
            f"train.global_batch_size = {global_batch} is not divisible by the world size {world_size}: every rank "
            "reads the same number of sequences. Choose a multiple of the world size."
        )
    per_rank = global_batch // world_size
    micro = cfg.train.batch_size or per_rank
    if per_rank % micro:
        raise SetupError(
            f"train.batch_size = {micro} does not divide the {per_rank} sequences each of the {world_size} rank(s) "
            f"trains on per step (train.global_batch_size = {global_batch}): choose a divisor of {per_rank}."
        )
    return micro, per_rank // micro
