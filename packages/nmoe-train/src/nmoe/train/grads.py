"""Gradient reductions across ranks and the global gradient norm.

Every rank's loss is its micro-batch mean cross-entropy times 1 / (grad_accum x world size), so the
sum of all ranks' gradients is the gradient of the global mean. Hence only sums below, never a mean
(a second division would shrink the step by the world size):
- dense parameters: summed over the whole world (every rank holds them);
- routed experts: each owner already received, through RDEP's backward, the contributions of every
  source in its expert-parallel group; the replicas of the same experts (the edp group) sum theirs.
The norm counts every distinct parameter once: the dense part is the same on every rank after its
reduction; the expert part is summed over the expert-parallel group (each rank holds a different slice).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from nmoe.train.distributed import World


def split_params(model: torch.nn.Module, expert_names: frozenset[str]) -> tuple[list, list]:
    """(dense params, routed-expert params) that require grad, in model order."""
    dense, experts = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (experts if name in expert_names else dense).append(p)
    return dense, experts


def _sum_grads_(params: Iterable[torch.nn.Parameter], world: World, over: str) -> None:
    """Sum the gradients of `params` over a group, one flat buffer per dtype (few large collectives)."""
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        world.all_reduce_sum_(flat, over=over)
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)


def reduce_gradients_(dense: list, experts: list, world: World) -> None:
    """Sum dense gradients over the world and expert gradients over their replicas (no-op on one rank)."""
    if not world.is_distributed:
        return
    _sum_grads_(dense, world, "world")
    if world.edp_group is not None:
        _sum_grads_(experts, world, "edp")


def global_grad_norm(dense: list, experts: list, world: World) -> torch.Tensor:
    """L2 norm of the whole model's gradient (fp32 scalar on the device), every parameter counted once."""
    dense_grads = [p.grad for p in dense if p.grad is not None]
    expert_grads = [p.grad for p in experts if p.grad is not None]
    if not world.is_distributed:
        return torch.nn.utils.get_total_norm(dense_grads + expert_grads, foreach=True)
    device = (dense_grads or expert_grads)[0].device
    dense_sq = _norm(dense_grads, device).square()
    expert_sq = _norm(expert_grads, device).square()
    world.all_reduce_sum_(expert_sq, over="ep")
    return (dense_sq + expert_sq).sqrt()


def _norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.nn.utils.get_total_norm(grads, foreach=True).float()
