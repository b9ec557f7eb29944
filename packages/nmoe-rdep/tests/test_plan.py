"""Planning layer: slot layout from the count matrix (pure tensor code, no kernels)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.rdep.plan import owner_layout, plan_source, source_slots


@settings(max_examples=50, deadline=None)
@given(world=st.sampled_from([1, 2, 4, 8]), experts_per_rank=st.integers(1, 3), data=st.data())
def test_blocks_tile_each_receive_buffer_expert_major_then_source_major(world, experts_per_rank, data):
    n_experts = world * experts_per_rank
    counts = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.integers(0, 5), min_size=n_experts, max_size=n_experts), min_size=world, max_size=world
            )
        )
    )
    layout = owner_layout(counts, world)
    for owner in range(world):
        cursor = 0
        for local in range(experts_per_rank):
            expert = owner * experts_per_rank + local
            for src in range(world):
                assert int(layout.slot_base[owner, local, src]) == cursor
                cursor += int(counts[src, expert])
            assert int(layout.expert_offsets[owner, local]) == cursor
        assert int(layout.totals[owner]) == cursor


def test_source_slots_follow_token_order_and_skip_dropped_slots():
    ids = torch.tensor([[0, 3], [0, 2], [-1, 3], [1, 0]])  # slot (2,0) was dropped by a capacity limit
    plan = plan_source(ids, n_experts=4)
    assert plan.counts.tolist() == [3, 1, 1, 2]
    kept = plan.expert >= 0
    assert plan.rank_in_expert[kept].tolist() == [0, 0, 1, 0, 1, 0, 2]
    other = torch.tensor([[1, 1, 0, 0]], dtype=torch.int32)  # source 1 sends one row each to experts 0, 1
    layout = owner_layout(torch.cat([plan.counts[None], other]), world=2)
    dest_rank, dest_slot = source_slots(plan, layout, src_rank=0)
    assert dest_rank[kept].tolist() == [0, 1, 0, 1, 1, 0, 0]
    # owner 0: expert 0 = [src0: rows 0-2, src1: row 3], expert 1 = [src0: row 4, src1: row 5]
    # owner 1: expert 2 = [src0: row 0], expert 3 = [src0: rows 1-2]
    assert dest_slot.tolist() == [0, 1, 1, 0, -1, 2, 4, 2]
