"""Planning: from routing and the world layout to slots in every owner's receive buffer.

Pure tensor functions (device-side, no host synchronisation). Vocabulary:
- rank r owns global experts [r*El, (r+1)*El), El = E // W; expert e is local expert e % El of
  owner e // El;
- the count matrix C[W_src, E] says how many rows each source sends to each expert;
- an owner's receive buffer is laid out expert-major, then source-major: all rows of its local
  expert 0 (from source 0, then source 1, ...), then local expert 1, ... So the rows arrive
  already grouped by local expert, and within one (expert, source) block in token order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nmoe.kernels import rank_in_expert, sort_by_expert


class SourcePlan(NamedTuple):
    """What one source sends, before it knows where."""

    counts: torch.Tensor  # [E] int32: rows sent to each expert (dropped slots, id -1, not counted)
    rank_in_expert: torch.Tensor  # [T*K] int64: position of slot (t,k) among its expert's rows, token order
    expert: torch.Tensor  # [T*K] int64: global expert of slot (t,k), -1 for a dropped slot


class Layout(NamedTuple):
    """Receive-buffer layout of every owner, identical on every rank (computed from C)."""

    slot_base: torch.Tensor  # [W_owner, El, W_src] int64: first row of each (expert, source) block
    totals: torch.Tensor  # [W_owner] int64: rows each owner receives
    expert_offsets: torch.Tensor  # [W_owner, El] int32: cumulative end row of each local expert


def plan_source(topk_ids: torch.Tensor, n_experts: int) -> SourcePlan:
    """topk_ids[T,K] int in [-1, E) -> SourcePlan; slots with id -1 (dropped by a capacity limit) are not sent."""
    routing = sort_by_expert(topk_ids, n_experts)
    rank = rank_in_expert(topk_ids, n_experts, routing)
    return SourcePlan(routing.counts, rank, topk_ids.reshape(-1).to(torch.int64))


def owner_layout(count_matrix: torch.Tensor, world: int) -> Layout:
    """C[W_src, E] rows per (source, expert) -> Layout of every owner's receive buffer."""
    n_sources, n_experts = count_matrix.shape
    per_rank = n_experts // world
    blocks = count_matrix.to(torch.int64).view(n_sources, world, per_rank).permute(1, 2, 0)  # [own, l, src]
    flat = blocks.reshape(world, per_rank * n_sources)
    inclusive = flat.cumsum(1)
    slot_base = (inclusive - flat).view(world, per_rank, n_sources)
    totals = inclusive[:, -1]
    expert_offsets = blocks.sum(2).cumsum(1).to(torch.int32)
    return Layout(slot_base, totals, expert_offsets)


def source_slots(plan: SourcePlan, layout: Layout, src_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dest_rank[T*K] int32, dest_slot[T*K] int32) for this source; dropped slots get -1."""
    per_rank = layout.slot_base.shape[1]
    expert = plan.expert.clamp(min=0)
    owner = expert // per_rank
    slot = layout.slot_base[owner, expert % per_rank, src_rank] + plan.rank_in_expert
    slot = torch.where(plan.expert >= 0, slot, torch.full_like(slot, -1))
    return owner.to(torch.int32), slot.to(torch.int32)
