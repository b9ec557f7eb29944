"""Plain-PyTorch reference implementations: the CPU path and every test's oracle.

Differentiable through ordinary autograd. Never used on the GPU path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ExpertSort(NamedTuple):
    """Expert-grouped order of the flat `(t*K + k)` routing slots."""

    counts: torch.Tensor  # [E] int32: rows routed to each expert
    offsets: torch.Tensor  # [E] int32: cumulative end row of each expert
    order: torch.Tensor  # [T*K] int64: flat slot index of the j-th grouped row


def group_sizes(offsets: torch.Tensor) -> list[int]:
    """Per-expert row counts from cumulative end offsets (host sync: reference only)."""
    ends = offsets.to(torch.int64).tolist()
    return [end - start for start, end in zip([0] + ends[:-1], ends)]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x[M,K] @ w[e][K,N] for the rows of each expert group -> [M,N]; rows past offsets[-1] are 0."""
    sizes = group_sizes(offsets)
    used = sum(sizes)
    if min(sizes, default=0) < 0 or used > x.shape[0]:
        raise ValueError(f"offsets must be non-decreasing and end at most at M={x.shape[0]}: {offsets.tolist()}")
    parts = [chunk @ w[e] for e, chunk in enumerate(torch.split(x[:used], sizes))]
    tail = x.new_zeros(x.shape[0] - used, w.shape[2])
    return torch.cat(parts + [tail], dim=0)


def sort_by_expert(topk_ids: torch.Tensor, n_experts: int) -> ExpertSort:
    """topk_ids[T,K] int -> ExpertSort(counts[E] int32, offsets[E] int32, order[T*K] int64)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return ExpertSort(counts.to(torch.int32), torch.cumsum(counts, 0).to(torch.int32), order)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h[R,2H] (gate | up) -> silu(gate) * up [R,H]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x[T,D], topk_ids/weights[T,K], w_up[E,D,2H], w_down[E,H,D] -> y[T,D] = sum_k w_tk * expert(x_t)."""
    n_tokens, top_k = topk_ids.shape
    routing = sort_by_expert(topk_ids, w_up.shape[0])
    token = routing.order // top_k
    hidden = swiglu(grouped_mm(x[token], w_up, routing.offsets))
    out = grouped_mm(hidden, w_down, routing.offsets)
    weight = topk_weights.reshape(-1)[routing.order].to(out.dtype)
    y = torch.zeros(n_tokens, x.shape[1], dtype=out.dtype, device=x.device)
    return y.index_add(0, token, out * weight[:, None])
