"""RDEP in a simulated world: W ranks in one process, the GPU path's planning and Triton kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.kernels import drop_over_capacity, grouped_mm
from nmoe.rdep import RdepCapacityError, RdepConfig, SimulatedWorld

F64 = torch.float64
MODES = ("uniform", "skewed", "subset")


def make_routing(gen: torch.Generator, n_tokens: int, n_experts: int, top_k: int, mode: str) -> torch.Tensor:
    """-> topk_ids[T,K] int64 with K distinct experts per token."""
    scores = torch.rand(n_tokens, n_experts, generator=gen, dtype=F64)
    if mode == "skewed":  # most tokens pick the first experts (owned by rank 0 when El > K)
        scores[:, : top_k + 1] += 2.0
    elif mode == "subset":  # most experts receive nothing at all
        allowed = torch.rand(n_experts, generator=gen) < 0.3
        allowed[torch.randperm(n_experts, generator=gen)[:top_k]] = True
        scores[:, ~allowed] = -1.0
    return scores.topk(top_k, dim=1).indices


def world_inputs(seed: int, world: int, tokens: list[int], n_experts: int, top_k: int, hidden: int, mode: str):
    """Per rank: x[T_r,D] with x[t] = (rank, t, noise...), topk_ids[T_r,K], topk_weights[T_r,K]."""
    gen = torch.Generator().manual_seed(seed)
    xs, ids, ws = [], [], []
    for rank, n in enumerate(tokens):
        x = torch.randn(n, hidden, generator=gen, dtype=F64)
        x[:, 0], x[:, 1] = rank, torch.arange(n, dtype=F64)
        xs.append(x)
        ids.append(make_routing(gen, n, n_experts, top_k, mode))
        ws.append(torch.rand(n, top_k, generator=gen, dtype=F64))
    return xs, ids, ws


def config(world: int, experts_per_rank: int, top_k: int, hidden: int, max_tokens: int, **kw) -> RdepConfig:
    kw.setdefault("capacity_margin", float(world))  # can never overflow
    return RdepConfig(
        dim=hidden,
        n_routed_experts=world * experts_per_rank,
        top_k=top_k,
        max_tokens_per_rank=max_tokens,
        dtype=F64,
        **kw,
    )


def group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def reference_moe(x, ids, ws, mats, keep=None):
    """Single-device oracle: y_t = sum_k w_tk * x_t @ mats[e_tk] over kept slots."""
    per_slot = torch.einsum("td,tkde->tke", x, mats[ids])
    weight = ws if keep is None else ws * keep
    return (weight[..., None] * per_slot).sum(1)


worlds = st.sampled_from([1, 2, 4, 8])
modes = st.sampled_from(MODES)


@settings(max_examples=30, deadline=None)
@given(
    world=worlds,
    experts_per_rank=st.integers(1, 2),
    top_k=st.integers(1, 3),
    mode=modes,
    tokens=st.lists(st.integers(0, 6), min_size=8, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_every_slot_reaches_its_expert_once_and_returns_to_its_slot(world, experts_per_rank, top_k, mode, tokens, seed):
    n_experts = world * experts_per_rank
    top_k = min(top_k, n_experts)
    tokens = tokens[:world]
    xs, ids, _ = world_inputs(seed, world, tokens, n_experts, top_k, hidden=4, mode=mode)
    sim = SimulatedWorld(world, config(world, experts_per_rank, top_k, 4, max(max(tokens), 1)))
    base = n_experts + 1  # weights base**k make y[t] the base-(E+1) number whose digits are e_tk
    ws = [torch.full((n, top_k), float(base), dtype=F64) ** torch.arange(top_k, dtype=F64) for n in tokens]
    outs = sim.dispatch_all(xs, ids, ws)

    expert_ys = []
    for owner, (expert_x, offsets, handle) in enumerate(outs):
        assert expert_x.shape == (handle.n_received, 4) and offsets.shape == (experts_per_rank,)
        assert offsets.dtype == torch.int32 and int(offsets[-1]) == expert_x.shape[0]
        received, tagged = [], torch.empty_like(expert_x)
        for local, (start, end) in enumerate(group_bounds(offsets)):
            expert = owner * experts_per_rank + local
            rows = [(int(r[0]), int(r[1])) for r in expert_x[start:end]]
            assert rows == sorted(rows), "rows of an expert arrive source-major, in token order"
            received += [(src, t, expert) for src, t in rows]
            tagged[start:end] = expert
        expected = [
            (src, t, int(e))
            for src in range(world)
            for t in range(tokens[src])
            for e in ids[src][t]
            if int(e) // experts_per_rank == owner
        ]
        assert sorted(received) == sorted(expected)
        expert_ys.append(tagged)

    ys = sim.combine_all(expert_ys, [h for _, _, h in outs])
    for src in range(world):
        digits = ys[src][:, 0].round().long()
        decoded = torch.stack([(digits // base**k) % base for k in range(top_k)], dim=1)
        assert torch.equal(decoded, ids[src])


@settings(max_examples=25, deadline=None)
@given(
    world=worlds,
    experts_per_rank=st.integers(1, 2),
    top_k=st.integers(1, 3),
    mode=modes,
    tokens=st.lists(st.integers(0, 5), min_size=8, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_combine_and_gradients_equal_single_device_reference(world, experts_per_rank, top_k, mode, tokens, seed):
    n_experts, hidden = world * experts_per_rank, 3
    top_k = min(top_k, n_experts)
    tokens = tokens[:world]
    xs, ids, ws = world_inputs(seed, world, tokens, n_experts, top_k, hidden, mode)
    gen = torch.Generator().manual_seed(seed + 1)
    mats = torch.randn(n_experts, hidden, hidden, generator=gen, dtype=F64)
    grads_out = [torch.randn(n, hidden, generator=gen, dtype=F64) for n in tokens]

    leaves = [t.clone().requires_grad_() for t in xs + ws] + [mats.clone().requires_grad_()]
    sim = SimulatedWorld(world, config(world, experts_per_rank, top_k, hidden, max(max(tokens), 1)))
    outs = sim.dispatch_all(leaves[:world], ids, leaves[world : 2 * world])
    local_mats = leaves[-1].view(world, experts_per_rank, hidden, hidden)
    expert_ys = [grouped_mm(ex, local_mats[r], offs) for r, (ex, offs, _) in enumerate(outs)]
    ys = sim.combine_all(expert_ys, [h for _, _, h in outs])

    ref_leaves = [t.clone().requires_grad_() for t in xs + ws] + [mats.clone().requires_grad_()]
    refs = [reference_moe(ref_leaves[r], ids[r], ref_leaves[world + r], ref_leaves[-1]) for r in range(world)]
    for y, ref in zip(ys, refs):
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)

    got = torch.autograd.grad(sum((y * g).sum() for y, g in zip(ys, grads_out)), leaves, allow_unused=True)
    want = torch.autograd.grad(sum((y * g).sum() for y, g in zip(refs, grads_out)), ref_leaves, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(
            a if a is not None else torch.zeros_like(b),
            b if b is not None else torch.zeros_like(a),
            rtol=1e-12,
            atol=1e-12,
        )


def test_two_layers_and_two_steps_reuse_the_buffers():
    world, experts_per_rank, top_k, hidden, n = 4, 2, 2, 5, 6
    n_experts = world * experts_per_rank
    sim = SimulatedWorld(world, config(world, experts_per_rank, top_k, hidden, n))
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(n_experts, hidden, hidden, generator=gen, dtype=F64) / 2 for _ in range(2)]
    for step in range(2):
        xs, ids, ws = world_inputs(10 + step, world, [n] * world, n_experts, top_k, hidden, "uniform")
        ids2 = [make_routing(gen, n, n_experts, top_k, "skewed") for _ in range(world)]
        leaves = [x.clone().requires_grad_() for x in xs]

        h = leaves
        for layer, layer_ids in enumerate((ids, ids2)):
            outs = sim.dispatch_all(h, layer_ids, ws)
            local = mats[layer].view(world, experts_per_rank, hidden, hidden)
            h = sim.combine_all(
                [grouped_mm(ex, local[r], offs) for r, (ex, offs, _) in enumerate(outs)], [o[2] for o in outs]
            )

        ref_leaves = [x.clone().requires_grad_() for x in xs]
        ref = [
            reference_moe(reference_moe(x, i1, w, mats[0]), i2, w, mats[1])
            for x, i1, i2, w in zip(ref_leaves, ids, ids2, ws)
        ]
        for a, b in zip(h, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(sum(y.square().sum() for y in h), leaves)
        want = torch.autograd.grad(sum(y.square().sum() for y in ref), ref_leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_overflow_raises_with_sizes_and_config_key_then_recovers():
    world, n = 4, 6
    sim = SimulatedWorld(world, config(world, 2, 2, 3, n, capacity_margin=1.0))
    xs, _, ws = world_inputs(0, world, [n] * world, 8, 2, 3, "uniform")
    to_rank0 = [torch.tensor([[0, 1]] * n) for _ in range(world)]  # 48 rows for a 12-row buffer
    with pytest.raises(RdepCapacityError) as err:
        sim.dispatch_all(xs, to_rank0, ws)
    message = str(err.value)
    assert "owner rank 0 would receive 48 rows" in message and "holds 12 rows" in message
    assert "capacity_margin" in message and "drop_over_capacity" in message

    _, ids, _ = world_inputs(1, world, [n] * world, 8, 2, 3, "uniform")
    # token t of rank r goes to both experts of owner (t + r) % 4: exactly 12 rows per owner
    balanced = [torch.tensor([[2 * ((t + r) % 4), 2 * ((t + r) % 4) + 1] for t in range(n)]) for r in range(world)]
    outs = sim.dispatch_all(xs, balanced, ws)  # the same world works after the failed step
    ys = sim.combine_all([ex for ex, _, _ in outs], [h for _, _, h in outs])
    for x, w, y in zip(xs, ws, ys):
        torch.testing.assert_close(y, x * w.sum(1, keepdim=True))


@settings(max_examples=15, deadline=None)
@given(world=st.sampled_from([2, 4]), cap=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_dropped_slots_are_never_sent_and_the_capacity_sizes_the_buffer(world, cap, seed):
    experts_per_rank, top_k, hidden, n = 2, 2, 3, 8
    n_experts = world * experts_per_rank
    cfg = config(world, experts_per_rank, top_k, hidden, n, expert_capacity=cap)
    sim = SimulatedWorld(world, cfg)
    assert sim.ranks[0].receive_rows == min(world * n * top_k, world * experts_per_rank * cap)
    xs, ids, ws = world_inputs(seed, world, [n] * world, n_experts, top_k, hidden, "skewed")
    capped = [drop_over_capacity(i, n_experts, cap) for i in ids]
    mats = torch.randn(n_experts, hidden, hidden, generator=torch.Generator().manual_seed(seed), dtype=F64)
    outs = sim.dispatch_all(xs, capped, ws)
    local = mats.view(world, experts_per_rank, hidden, hidden)
    ys = sim.combine_all(
        [grouped_mm(ex, local[r], offs) for r, (ex, offs, _) in enumerate(outs)], [h for _, _, h in outs]
    )
    received = sum(ex.shape[0] for ex, _, _ in outs)
    assert received == sum(int((c >= 0).sum()) for c in capped)
    for rank in range(world):
        keep = (capped[rank] >= 0).to(F64)
        assert int(outs[rank][2].dropped) == int((capped[rank] < 0).sum()) == int(sim.ranks[rank].dropped_rows)
        ref = reference_moe(xs[rank], ids[rank], ws[rank], mats, keep)
        torch.testing.assert_close(ys[rank], ref, rtol=1e-12, atol=1e-12)


def test_world_must_divide_experts():
    with pytest.raises(ValueError, match="n_routed_experts=6 is not divisible by the expert-parallel world size 4"):
        SimulatedWorld(4, RdepConfig(dim=4, n_routed_experts=6, top_k=2, max_tokens_per_rank=4))


def test_bad_inputs_fail_loud():
    sim = SimulatedWorld(2, config(2, 1, 1, 4, 3))
    x, ids, w = torch.zeros(3, 4, dtype=F64), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=F64)
    too_many = (
        [torch.zeros(4, 4, dtype=F64), x],
        [torch.zeros(4, 1, dtype=torch.long), ids],
        [torch.ones(4, 1, dtype=F64), w],
    )
    with pytest.raises(RdepCapacityError, match="max_tokens_per_rank=3"):
        sim.dispatch_all(*too_many)
    steps = [rank._plan_steps(*args) for rank, args in zip(sim.ranks, zip(*too_many))]
    for rank_steps in steps:
        next(rank_steps)  # every rank signals its counts (rank 0 a -1 row)
    for rank_steps in steps:  # and every rank, not only rank 0, raises instead of waiting forever
        with pytest.raises(RdepCapacityError, match=r"ranks \[0\] dispatch more tokens"):
            next(rank_steps)
    with pytest.raises(ValueError, match=r"x must be \[T, 4\]"):
        sim.dispatch_all([x.float(), x.float()], [ids, ids], [w, w])
    with pytest.raises(ValueError, match="topk_ids and topk_weights must be"):
        sim.dispatch_all([x, x], [ids[:, :0], ids[:, :0]], [w, w])
    with pytest.raises(RuntimeError, match="SimulatedWorld.dispatch_all"):
        sim.ranks[0].dispatch(x, ids, w)
    outs = sim.dispatch_all([x, x], [ids, ids], [w, w])
    with pytest.raises(ValueError, match="expert_y must be"):
        sim.combine_all([outs[0][0][:0], outs[1][0]], [o[2] for o in outs])


def test_single_rank_world_runs_through_rdep_methods():
    sim = SimulatedWorld(1, config(1, 4, 2, 4, 5))
    xs, ids, ws = world_inputs(5, 1, [5], 4, 2, 4, "uniform")
    sim.ranks[0]._group.lockstep = False  # one rank: the same straight-through driver a GPU rank uses
    sim.ranks[0]._group.members = sim.ranks
    expert_x, offsets, handle = sim.ranks[0].dispatch(xs[0], ids[0], ws[0])
    y = sim.ranks[0].combine(expert_x * 2, handle)
    torch.testing.assert_close(y, 2 * xs[0] * ws[0].sum(1, keepdim=True))
