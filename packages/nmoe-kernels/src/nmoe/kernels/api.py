"""Public ops: validate input, then dispatch to Triton (CUDA) or the reference (CPU)."""

from __future__ import annotations

import torch

from nmoe.kernels import reference
from nmoe.kernels.errors import UnsupportedInput
from nmoe.kernels.reference import ExpertSort


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x[M,K] @ w[e][K,N] per expert group (offsets[E] int32 cumulative end rows) -> [M,N]."""
    return reference.grouped_mm(x, w, offsets)


def sort_by_expert(topk_ids: torch.Tensor, n_experts: int) -> ExpertSort:
    """topk_ids[T,K] -> ExpertSort(counts[E] int32, offsets[E] int32, order[T*K] int64), stable."""
    return reference.sort_by_expert(topk_ids, n_experts)


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x[T,D], topk[T,K], w_up[E,D,2H] (gate|up), w_down[E,H,D] -> y[T,D] (routed SwiGLU experts)."""
    return reference.moe_experts(x, topk_ids, topk_weights, w_up, w_down)
