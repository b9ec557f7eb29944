"""Plain-PyTorch reference implementations: the CPU path and every test's oracle.

Differentiable through ordinary autograd. Never used on the GPU path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from nmoe.kernels.errors import UnsupportedInput


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
    """topk_ids[T,K] int in [-1,E) (-1: dropped) -> ExpertSort(counts[E] int32, offsets[E] int32, order[T*K] int64).

    Dropped slots are not counted and come last in `order` (rows [offsets[-1], T*K) of the grouped layout).
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < -1 or int(flat.max()) >= n_experts):
        raise UnsupportedInput(
            f"topk_ids must lie in [-1, {n_experts}) (-1 marks a dropped slot); got values in "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    bins = torch.where(flat < 0, n_experts, flat)
    order = torch.sort(bins, stable=True).indices
    counts = torch.bincount(bins, minlength=n_experts + 1)[:n_experts]
    return ExpertSort(counts.to(torch.int32), torch.cumsum(counts, 0).to(torch.int32), order)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h[R,2H] (gate | up) -> silu(gate) * up [R,H]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(pre: torch.Tensor, d_act: torch.Tensor) -> torch.Tensor:
    """pre[R,2H] (gate | up), d_act[R,H] = dL/d(silu(gate) * up) -> dL/d(pre) [R,2H]."""
    gate, up = pre.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    d_up = d_act * gate * sig
    d_gate = d_act * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, d_up], dim=-1)


def expert_mlp_parts(rows: torch.Tensor, offsets: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    """rows[M,D] grouped by expert -> (y[M,D], pre[M,2H], act[M,H]) of the SwiGLU expert MLP."""
    pre = grouped_mm(rows, w_up, offsets)
    act = swiglu(pre)
    return grouped_mm(act, w_down, offsets), pre, act


def expert_mlp(rows: torch.Tensor, offsets: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """rows[M,D] grouped by expert (offsets[E] int32), w_up[E,D,2H], w_down[E,H,D] -> y[M,D]; rows past offsets[-1] 0."""
    return expert_mlp_parts(rows, offsets, w_up, w_down)[0]


def moe_experts_parts(x, topk_ids, topk_weights, w_up, w_down):
    """-> (y[T,D], pre[R,2H], act[R,H], offsets[E] int32, order[R] int64, token[R] int32, pos[R] int32), R = T*K."""
    n_tokens, top_k = topk_ids.shape
    routing = sort_by_expert(topk_ids, w_up.shape[0])
    token = routing.order // top_k
    out, pre, act = expert_mlp_parts(x[token], routing.offsets, w_up, w_down)
    kept = int(routing.offsets[-1]) if routing.offsets.numel() else 0
    weight = topk_weights.reshape(-1)[routing.order[:kept]].to(out.dtype)
    y = torch.zeros(n_tokens, x.shape[1], dtype=out.dtype, device=x.device)
    y = y.index_add(0, token[:kept], out[:kept] * weight[:, None])
    pos = torch.empty_like(routing.order).scatter_(0, routing.order, torch.arange(len(routing.order), device=x.device))
    return y, pre, act, routing.offsets, routing.order, token.to(torch.int32), pos.to(torch.int32)


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x[T,D], topk_ids[T,K] (-1: dropped), weights[T,K], w_up[E,D,2H], w_down[E,H,D] -> y[T,D] = sum_k w_tk expert(x_t)."""
    return moe_experts_parts(x, topk_ids, topk_weights, w_up, w_down)[0]


# Backward formulas. The CPU path of the custom ops (nmoe.kernels._ops) uses these: autograd does not record
# inside an op. Tests check them against autograd through the forward functions above.


def grouped_dw(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a[M,Ka], b[M,N] -> [E,Ka,N] with [e] = a[rows of e]^T @ b[rows of e] (0 for empty groups)."""
    sizes = group_sizes(offsets)
    used = sum(sizes)
    parts = [ea.T @ eb for ea, eb in zip(torch.split(a[:used], sizes), torch.split(b[:used], sizes))]
    return torch.stack(parts) if parts else a.new_zeros(0, a.shape[1], b.shape[1])


def grouped_mm_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor):
    """dy[M,N] -> (dx[M,K], dw[E,K,N]) of grouped_mm(x, w, offsets)."""
    return grouped_mm(dy, w.transpose(1, 2), offsets), grouped_dw(x, dy, offsets)


def expert_mlp_backward(dy, rows, offsets, w_up, w_down, pre, act):
    """dy[M,D] -> (d_rows[M,D], dw_up[E,D,2H], dw_down[E,H,D]) from the forward's pre/act."""
    d_pre = swiglu_backward(pre, grouped_mm(dy, w_down.transpose(1, 2), offsets))
    dw_down = grouped_dw(act, dy, offsets)
    dw_up = grouped_dw(rows, d_pre, offsets)
    return grouped_mm(d_pre, w_up.transpose(1, 2), offsets), dw_up, dw_down


def moe_experts_backward(dy, x, topk_weights, w_up, w_down, offsets, order, token, pos, pre, act):
    """dy[T,D] -> (dx[T,D], d_topk_weights[T,K], dw_up, dw_down) from the forward's saved routing and pre/act."""
    n_tokens, top_k = topk_weights.shape
    kept = int(offsets[-1]) if offsets.numel() else 0
    token = token.to(torch.int64)
    weight = topk_weights.reshape(-1)[order].to(dy.dtype)
    weight[kept:] = 0
    dy_rows = dy[token]
    d_weighted = grouped_mm(dy_rows, w_down.transpose(1, 2), offsets)  # dL/d(act) before the routing weight
    d_weights = torch.zeros(order.shape[0], dtype=torch.promote_types(dy.dtype, torch.float32), device=dy.device)
    d_weights[order] = (d_weighted * act).sum(1).to(d_weights.dtype)
    d_pre = swiglu_backward(pre, d_weighted * weight[:, None])
    dw_down = grouped_dw(act, dy_rows * weight[:, None], offsets)
    dw_up = grouped_dw(x[token], d_pre, offsets)
    d_rows = grouped_mm(d_pre, w_up.transpose(1, 2), offsets)
    dx = torch.zeros_like(x).index_add(0, token[:kept], d_rows[:kept])
    return dx, d_weights.view(n_tokens, top_k).to(topk_weights.dtype), dw_up, dw_down
