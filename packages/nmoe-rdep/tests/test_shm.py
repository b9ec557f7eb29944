"""The shared-memory transport across real processes (gloo for setup only): exact, collective-free, loud on a dead peer."""

from __future__ import annotations

import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nmoe.kernels import grouped_mm
from nmoe.rdep import Rdep, RdepConfig, RdepTimeoutError, ShmTransport
from nmoe.rdep.testing import forbid_collectives

F64 = torch.float64
pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="ShmTransport needs /dev/shm (Linux)")


def _config(world: int, timeout: float = 60.0) -> RdepConfig:
    return RdepConfig(dim=6, n_routed_experts=2 * world, top_k=2, max_tokens_per_rank=7, capacity_margin=float(world),
                      dtype=F64, wait_timeout_s=timeout)  # fmt: skip


def _inputs(rank: int, world: int):
    gen = torch.Generator().manual_seed(100 + rank)
    n = 7 - rank  # ranks differ in T
    x = torch.randn(n, 6, generator=gen, dtype=F64)
    ids = torch.rand(n, 2 * world, generator=gen).topk(2, dim=1).indices
    w = torch.rand(n, 2, generator=gen, dtype=F64)
    return x, ids, w


def _run(rank: int, world: int, init: str, scenario: str, errors) -> None:
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        if scenario == "exact":
            _exact(rank, world)
        elif scenario == "dead":
            _dead_peer(rank, world)
        else:
            _silent_peer(rank, world)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        os._exit(0)  # a peer may be gone: skip the process group's teardown


def _reference(x, ids, w, mats):
    """y[t] = sum_k w[t,k] * x[t] @ mats[ids[t,k]] on one device."""
    return torch.einsum("td,tkde->tke", x, mats[ids]).mul(w[..., None]).sum(1)


def _exact(rank: int, world: int) -> None:
    cfg = _config(world)
    rdep = Rdep(cfg, ShmTransport.for_config(cfg))
    mats = torch.randn(cfg.n_routed_experts, 6, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    for step in range(3):  # the buffers are reused across steps
        local = mats.view(world, 2, 6, 6)[rank].clone().requires_grad_()
        x, ids, w = (t.clone() for t in _inputs(rank + 10 * step, world))
        x.requires_grad_()
        w.requires_grad_()
        with forbid_collectives():
            rows, offsets, handle = rdep.dispatch(x, ids, w)
            y = rdep.combine(grouped_mm(rows, local, offsets), handle)
            y.backward(torch.ones_like(y))
        rdep.check()
        ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ref = _reference(ref_x, ids, ref_w, mats)
        ref.backward(torch.ones_like(ref))
        torch.testing.assert_close(y.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-12, atol=1e-12)
        # this rank's expert shard gets the gradient of every rank's tokens
        full = mats.clone().requires_grad_()
        total = sum(_reference(*_inputs(r + 10 * step, world), full).sum() for r in range(world))
        (full_grad,) = torch.autograd.grad(total, full)
        torch.testing.assert_close(local.grad, full_grad.view(world, 2, 6, 6)[rank], rtol=1e-12, atol=1e-12)


def _dead_peer(rank: int, world: int) -> None:
    cfg = _config(world)
    rdep = Rdep(cfg, ShmTransport.for_config(cfg))
    x, ids, w = _inputs(rank, world)
    if rank == world - 1:
        os._exit(0)  # this rank dies before the step
    start = time.monotonic()
    with pytest.raises(RdepTimeoutError, match=rf"rank\(s\) \[{world - 1}\] of this expert-parallel group stopped"):
        rdep.dispatch(x, ids, w)
    assert time.monotonic() - start < 30  # found by its process, not by the 60 s timeout


def _silent_peer(rank: int, world: int) -> None:
    cfg = _config(world, timeout=2.0)
    rdep = Rdep(cfg, ShmTransport.for_config(cfg))
    x, ids, w = _inputs(rank, world)
    if rank == world - 1:
        time.sleep(15)  # alive but never dispatches
        return
    with pytest.raises(RdepTimeoutError, match=rf"rank {world - 1} did not signal within RdepConfig.wait_timeout_s=2"):
        rdep.dispatch(x, ids, w)


def _spawn(world: int, scenario: str, tmp_path) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    init = f"file://{tmp_path / f'init-{scenario}-{world}'}"
    procs = [ctx.Process(target=_run, args=(r, world, init, scenario, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode is not None, "a rank hung"
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_transport_is_exact_and_collective_free(world, tmp_path):
    _spawn(world, "exact", tmp_path)


def test_a_dead_peer_is_named_at_once(tmp_path):
    _spawn(2, "dead", tmp_path)


def test_a_silent_peer_times_out_naming_it(tmp_path):
    _spawn(2, "silent", tmp_path)


def test_shared_files_are_gone_once_mapped(tmp_path):
    before = {p for p in os.listdir("/dev/shm") if p.startswith("nmoe-rdep-")}
    _spawn(2, "exact", tmp_path)
    assert {p for p in os.listdir("/dev/shm") if p.startswith("nmoe-rdep-")} <= before
