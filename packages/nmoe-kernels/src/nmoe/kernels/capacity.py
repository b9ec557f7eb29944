"""Expert capacity: the one definition of which routed (token, k) pairs a capacity limit drops.

Priority is token order (slot t*K + k): each expert keeps its first `capacity` slots. A dropped slot's
expert id becomes -1, which every consumer (moe_experts, sort_by_expert, nmoe.rdep) treats as "not
routed": never sent, never computed, contributing 0. Under expert parallelism each rank applies the
limit to its own tokens, so a source sends at most `capacity` rows to any one expert.
"""

from __future__ import annotations

import math

import torch

from nmoe.kernels.api import sort_by_expert
from nmoe.kernels.reference import ExpertSort


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int | None:
    """Slots per expert for n_tokens tokens: max(1, ceil(factor * T * K / E)); None when factor <= 0 (dropless)."""
    if factor <= 0:
        return None
    return max(1, math.ceil(factor * n_tokens * top_k / n_experts))


def rank_in_expert(topk_ids: torch.Tensor, n_experts: int, routing: ExpertSort | None = None) -> torch.Tensor:
    """[T*K] int64: position of slot (t,k) among the slots routed to its expert, in token order (no host sync).

    `routing` may pass `sort_by_expert(topk_ids, n_experts)` when the caller has it already.
    """
    routing = sort_by_expert(topk_ids, n_experts) if routing is None else routing
    first_row = (routing.offsets - routing.counts).to(torch.int64)
    experts = topk_ids.reshape(-1).to(torch.int64)
    grouped = torch.arange(experts.numel(), device=experts.device) - first_row[experts[routing.order].clamp(min=0)]
    rank = torch.empty_like(grouped)
    rank[routing.order] = grouped
    return rank


def drop_over_capacity(topk_ids: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """topk_ids[T,K] with -1 where the slot is past its expert's first `capacity` slots (token order)."""
    keep = (rank_in_expert(topk_ids, n_experts) < capacity).view_as(topk_ids)
    return torch.where(keep, topk_ids, torch.full_like(topk_ids, -1))
