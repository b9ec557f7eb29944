"""Construction-time agreement between ranks over torch.distributed (never used on the expert path)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def broadcast_bytes(payload: np.ndarray, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite the uint8 array `payload` on every rank with group rank 0's copy (in place)."""
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    staged = torch.from_numpy(np.array(payload, dtype=np.uint8)).to(device)  # plain ndarray copy
    dist.broadcast(staged, src=dist.get_global_rank(group or dist.group.WORLD, 0), group=group)
    payload[...] = staged.cpu().numpy()


def require_same_allocation(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, group: dist.ProcessGroup | None = None
) -> None:
    """Raise on every rank unless every rank of the group asks for the same symmetric buffer now.

    nvshmem_malloc is a collective that does not check its size: ranks built from different
    configs (or in a different order) would silently get overlapping, mis-sized buffers.
    """
    mine = (name, tuple(int(n) for n in shape), str(dtype))
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if len(set(everyone)) > 1:  # the same verdict on every rank
        listing = "; ".join(f"rank {rank}: {value}" for rank, value in enumerate(everyone))
        raise ValueError(
            f"ranks disagree on the symmetric buffer to allocate ({listing}): every rank must build the same "
            "RdepConfig's Rdep instances in the same order"
        )
