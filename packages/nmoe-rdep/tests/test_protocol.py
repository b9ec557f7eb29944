"""The flag protocol's edges: the device-side wait, epoch wrap-around, and errors raised by every rank."""

from __future__ import annotations

import pytest
import torch

from nmoe.rdep import RdepCapacityError, RdepConfig, RdepTimeoutError, SimulatedWorld, kernels
from nmoe.rdep.kernels import EPOCH_PERIOD

F64 = torch.float64


def wait_status(flags: list[int], epoch: int) -> list[int]:
    status = torch.zeros(4, dtype=torch.int32)
    kernels.wait(torch.tensor(flags, dtype=torch.int32), epoch, status, timeout_s=1.0, polls=3)
    return status.tolist()


def test_wait_accepts_the_epoch_or_the_next_one_across_the_wrap():
    assert wait_status([7, 8, 7], 7) == [0, 0, 0, 0]
    assert wait_status([EPOCH_PERIOD - 1, 0], EPOCH_PERIOD - 1) == [0, 0, 0, 0]
    assert wait_status([0, 1], 0) == [0, 0, 0, 0]


def test_wait_gives_up_on_a_late_or_out_of_step_peer_and_records_it():
    assert wait_status([7, 6, 7], 7) == [1, 7, 1, 6]  # rank 1 never signalled epoch 7
    assert wait_status([9, 7, 7], 7) == [1, 7, 0, 9]  # rank 0 is 2 ahead: out of step, not "done"
    assert wait_status([EPOCH_PERIOD - 1, 0, 5], 0)[:1] == [2]  # 0 waits: a wrapped 2^30-1 is behind


def cfg(world: int, **kw) -> RdepConfig:
    return RdepConfig(
        dim=4,
        n_routed_experts=2 * world,
        top_k=2,
        max_tokens_per_rank=5,
        capacity_margin=float(world),
        dtype=F64,
        **kw,
    )


def inputs(world: int, n: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 4, generator=gen, dtype=F64) for _ in range(world)]
    ids = [torch.rand(n, 2 * world, generator=gen).topk(2, dim=1).indices for _ in range(world)]
    ws = [torch.rand(n, 2, generator=gen, dtype=F64) for _ in range(world)]
    return xs, ids, ws


def round_trip(sim: SimulatedWorld, seed: int) -> None:
    xs, ids, ws = inputs(sim.world, seed=seed)
    outs = sim.dispatch_all(xs, ids, ws)
    ys = sim.combine_all([2 * ex for ex, _, _ in outs], [h for _, _, h in outs])
    for x, w, y in zip(xs, ws, ys):
        torch.testing.assert_close(y, 2 * x * w.sum(1, keepdim=True), rtol=1e-12, atol=1e-12)


def test_epochs_wrap_around_without_breaking_the_protocol():
    world = 4
    sim = SimulatedWorld(world, cfg(world))
    start = EPOCH_PERIOD - 3  # as if 2^30 - 3 signals had already happened
    for rank in sim.ranks:
        rank._epoch = start
    for flags in sim.buffers.copies("rdep.flags"):
        flags.fill_(start)
    for step in range(3):  # each round trip signals 4 times: crosses the wrap
        round_trip(sim, seed=step)
    assert {rank._epoch for rank in sim.ranks} == {start + 12}
    assert all(f.tolist() == [(start + 12) % EPOCH_PERIOD] * world for f in sim.buffers.copies("rdep.flags"))


def test_invalid_input_on_one_rank_raises_on_every_rank_and_the_world_goes_on():
    world = 2
    sim = SimulatedWorld(world, cfg(world))
    xs, ids, ws = inputs(world)
    bad_x = [xs[0], xs[1].float()]  # rank 1 alone passes the wrong dtype
    steps = [rank._plan_steps(*args) for rank, args in zip(sim.ranks, zip(bad_x, ids, ws))]
    for rank_steps in steps:
        next(rank_steps)  # both ranks take part in the count exchange
    with pytest.raises(ValueError, match=r"ranks \[1\] passed invalid inputs"):
        next(steps[0])
    with pytest.raises(ValueError, match=r"rank 1: x must be \[T, 4\]"):
        next(steps[1])
    round_trip(sim, seed=1)


def test_expert_ids_out_of_range_raise_on_every_rank():
    world = 2
    sim = SimulatedWorld(world, cfg(world))
    xs, ids, ws = inputs(world)
    bad_ids = [ids[0], ids[1].clone()]
    bad_ids[1][3, 0] = 2 * world  # one id past the last expert
    steps = [rank._plan_steps(*args) for rank, args in zip(sim.ranks, zip(xs, bad_ids, ws))]
    for rank_steps in steps:
        next(rank_steps)
    for rank_steps in steps:
        with pytest.raises(
            ValueError, match=r"topk_ids on ranks \[1\] hold expert ids outside \[0, n_routed_experts=4\)"
        ):
            next(rank_steps)
    round_trip(sim, seed=2)


def test_a_wait_that_gave_up_is_reported_at_the_next_host_sync():
    world = 2
    sim = SimulatedWorld(world, cfg(world, wait_timeout_s=5.0))
    round_trip(sim, seed=3)
    sim.ranks[0].check()  # nothing recorded
    sim.ranks[1]._status.copy_(torch.tensor([1, 42, 0, 41], dtype=torch.int32))  # what kernels.wait records
    with pytest.raises(
        RdepTimeoutError, match=r"wait_timeout_s=5.0 s for 1 peer\(s\) to signal epoch 42 \(e.g. rank 0"
    ):
        sim.ranks[1].check()
    xs, ids, ws = inputs(world)
    with pytest.raises(RdepTimeoutError):
        sim.dispatch_all(xs, ids, ws)


def test_config_refuses_a_non_positive_timeout():
    with pytest.raises(ValueError, match="wait_timeout_s"):
        cfg(2, wait_timeout_s=0.0)
    with pytest.raises(RdepCapacityError):  # and too many tokens is still a capacity error
        SimulatedWorld(1, cfg(1)).dispatch_all(
            [torch.zeros(6, 4, dtype=F64)], [torch.zeros(6, 2, dtype=torch.long)], [torch.ones(6, 2, dtype=F64)]
        )
