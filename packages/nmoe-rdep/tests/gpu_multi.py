"""RDEP on real GPUs: torchrun --standalone --nproc_per_node=N packages/nmoe-rdep/tests/gpu_multi.py

N ranks on N GPUs of one NVLink domain (NCCL), or, when N exceeds the GPUs, N NVSHMEM PEs sharing them
(NVSHMEM's limited multi-process-per-GPU mode; torch.distributed then uses gloo): correct, not fast.
Checks, on every rank (N = 1, 2, 4 or 8, nvshmem4py installed):
1. exact transport: fp32 rows through dispatch -> per-expert scale -> combine, fwd + bwd;
2. a bf16 MoE layer (SwiGLU experts through nmoe.kernels.grouped_mm on each owner) equals the
   single-GPU reference (nmoe.kernels.reference.moe_experts over all ranks' tokens), fwd + bwd,
   including the expert-weight gradients of each owner's shard;
3. no torch.distributed collective (all_to_all*, all_reduce, ...) runs on the expert path: they
   are replaced by functions that raise for the whole dispatch -> experts -> combine -> backward;
4. overflow raises RdepCapacityError on every rank and the transport keeps working afterwards;
   slots dropped by a capacity limit (id -1) are never sent and are counted; invalid input on one rank
   raises ValueError on every rank;
5. skew: back-to-back fwd+bwd round trips with random GPU sleeps on random ranks (fast ranks run
   ahead into the next phase), exact every time: the flag protocol under real concurrency.
Every wait gives up after WAIT_S seconds and raises RdepTimeoutError instead of hanging the run.
Prints one PASS line per check on rank 0; any failure raises (non-zero exit).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nmoe.kernels import drop_over_capacity, grouped_mm
from nmoe.kernels.reference import moe_experts as reference_moe_experts
from nmoe.rdep import NvshmemTransport, Rdep, RdepCapacityError, RdepConfig
from nmoe.rdep.testing import CollectiveCalled, forbid_collectives

WAIT_S = 60.0  # a lost signal fails the run in a minute (RdepTimeoutError) instead of hanging it


def gather_all(t: torch.Tensor) -> list[torch.Tensor]:
    """All ranks' copies of t (same shape everywhere); used only outside the guarded region."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def routing(gen: torch.Generator, n_tokens: int, n_experts: int, top_k: int, device, skew: float = 0.0):
    scores = torch.rand(n_tokens, n_experts, generator=gen, device=device)
    scores[:, : top_k + 1] += skew
    ids = scores.topk(top_k, dim=1).indices
    weights = torch.softmax(torch.rand(n_tokens, top_k, generator=gen, device=device), dim=1)
    return ids, weights


def exact_config(world: int) -> RdepConfig:
    return RdepConfig(
        dim=512,
        n_routed_experts=4 * world,
        top_k=4,
        max_tokens_per_rank=2048,
        capacity_margin=float(world),
        dtype=torch.float32,
        wait_timeout_s=WAIT_S,
    )


def check_exact_transport(rank: int, world: int, device, transport) -> None:
    cfg = exact_config(world)
    rdep = Rdep(cfg, transport)
    gen = torch.Generator(device).manual_seed(100 + rank)
    n_tokens = 2048 - 97 * rank  # ranks differ in T
    x = torch.randn(n_tokens, cfg.dim, generator=gen, device=device, requires_grad=True)
    ids, w = routing(gen, n_tokens, cfg.n_routed_experts, cfg.top_k, device)
    w.requires_grad_()
    scale = torch.arange(1, cfg.n_routed_experts + 1, device=device, dtype=torch.float32)
    local = scale.view(world, -1)[rank]

    with forbid_collectives():
        expert_x, offsets, handle = rdep.dispatch(x, ids, w)
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
        expert_y = expert_x * torch.repeat_interleave(local, sizes, output_size=expert_x.shape[0])[:, None]
        y = rdep.combine(expert_y, handle)
        y.backward(torch.ones_like(y))
        torch.cuda.synchronize()
    rdep.check()

    want = x.detach() * (w.detach() * scale[ids]).sum(1, keepdim=True)
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        x.grad, (w.detach() * scale[ids]).sum(1, keepdim=True).expand_as(x), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(w.grad, x.detach().sum(1, keepdim=True) * scale[ids], rtol=1e-4, atol=1e-3)
    assert int(offsets[-1]) == expert_x.shape[0] == handle.n_received


def moe_config(world: int) -> RdepConfig:
    return RdepConfig(
        dim=1024,
        n_routed_experts=8 * world,
        top_k=6,
        max_tokens_per_rank=4096,
        capacity_margin=2.0,
        wait_timeout_s=WAIT_S,
    )


def check_moe_layer(rank: int, world: int, device, transport) -> None:
    cfg = moe_config(world)
    D, H, E, K, T = cfg.dim, 512, cfg.n_routed_experts, cfg.top_k, cfg.max_tokens_per_rank
    rdep = Rdep(cfg, transport)
    per_rank = E // world
    wgen = torch.Generator(device).manual_seed(0)  # the same expert weights on every rank
    w_up_all = (torch.randn(E, D, 2 * H, generator=wgen, device=device) / D**0.5).bfloat16()
    w_down_all = (torch.randn(E, H, D, generator=wgen, device=device) / H**0.5).bfloat16()
    w_up = w_up_all[rank * per_rank : (rank + 1) * per_rank].clone().requires_grad_()
    w_down = w_down_all[rank * per_rank : (rank + 1) * per_rank].clone().requires_grad_()

    gen = torch.Generator(device).manual_seed(1000 + rank)
    x = torch.randn(T, D, generator=gen, device=device).bfloat16().requires_grad_()
    ids, w = routing(gen, T, E, K, device)
    w.requires_grad_()
    dy = torch.randn(T, D, generator=gen, device=device).bfloat16()

    with forbid_collectives():
        expert_x, offsets, handle = rdep.dispatch(x, ids, w)
        gate, up = grouped_mm(expert_x, w_up, offsets).chunk(2, dim=-1)
        expert_y = grouped_mm(F.silu(gate) * up, w_down, offsets)
        y = rdep.combine(expert_y, handle)
        y.backward(dy)
        torch.cuda.synchronize()
    rdep.check()

    xs, idss, ws, dys = (gather_all(t.detach()) for t in (x, ids, w, dy))
    ref_x = torch.cat(xs).float().requires_grad_()
    ref_w = torch.cat(ws).requires_grad_()
    ref_up, ref_down = w_up_all.float().requires_grad_(), w_down_all.float().requires_grad_()
    ref_y = reference_moe_experts(ref_x, torch.cat(idss), ref_w, ref_up, ref_down)
    ref_y.backward(torch.cat(dys).float())
    mine = slice(rank * T, (rank + 1) * T)
    shard = slice(rank * per_rank, (rank + 1) * per_rank)

    def close(got, want, what):
        err = (got.float() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= 3e-2 * scale + 1e-3, f"rank {rank}: {what} max error {err:.3e} vs scale {scale:.3e}"

    close(y, ref_y[mine].detach(), "y")
    close(x.grad, ref_x.grad[mine], "dx")
    close(w.grad, ref_w.grad[mine], "dtopk_weights")
    close(w_up.grad, ref_up.grad[shard], "dw_up")
    close(w_down.grad, ref_down.grad[shard], "dw_down")


def check_guard_works() -> None:
    with forbid_collectives():
        try:
            dist.all_to_all_single(torch.empty(0), torch.empty(0))
        except CollectiveCalled:
            return
    raise AssertionError("forbid_collectives did not intercept all_to_all_single")


DROP_CAPACITY = 128  # rows one source may send to one expert in the dropping check


def overflow_configs(world: int) -> tuple[RdepConfig, RdepConfig]:
    # margin 0.5: each receive buffer holds 512 rows; a full step routed to owner 0 (world * 1024 rows) overflows
    # at every world size, W = 1 included, while a balanced half step (512 rows per owner) fits.
    common = dict(dim=256, n_routed_experts=2 * world, top_k=2, max_tokens_per_rank=512, dtype=torch.float32,
                  wait_timeout_s=WAIT_S)  # fmt: skip
    return RdepConfig(capacity_margin=0.5, **common), RdepConfig(expert_capacity=DROP_CAPACITY, **common)


def check_overflow_and_drop(rank: int, world: int, device, transport) -> None:
    cfg, drop_cfg = overflow_configs(world)
    rdep = Rdep(cfg, transport)
    x = torch.randn(512, 256, device=device)
    w = torch.ones(512, 2, device=device)
    to_rank0 = torch.tensor([[0, 1]], device=device).expand(512, 2)
    try:
        rdep.dispatch(x, to_rank0, w)
    except RdepCapacityError as err:
        assert "capacity_margin" in str(err)
    else:
        raise AssertionError("overflow did not raise")
    half = x[:256]
    spread = (torch.arange(256, device=device)[:, None] * 2 + torch.arange(2, device=device) + 2 * rank) % (2 * world)
    expert_x, _, handle = rdep.dispatch(half, spread, w[:256])
    torch.testing.assert_close(rdep.combine(expert_x, handle), 2 * half)

    dropper = Rdep(drop_cfg, transport)
    capped = drop_over_capacity(to_rank0, 2 * world, DROP_CAPACITY)  # the dispatch layer drops, RDEP never sends
    expert_x, _, handle = dropper.dispatch(x, capped, w)
    assert int(handle.dropped) == 2 * (512 - DROP_CAPACITY), int(handle.dropped)
    y = dropper.combine(expert_x, handle)
    torch.testing.assert_close(y[:DROP_CAPACITY], 2 * x[:DROP_CAPACITY])
    torch.testing.assert_close(y[DROP_CAPACITY:], torch.zeros_like(y[DROP_CAPACITY:]))
    dropper.check()
    x, w = half, w[:256]  # the rest of the check reuses the balanced half step

    wrong = x.double() if rank == 0 else x  # only rank 0 passes a wrong dtype
    try:
        rdep.dispatch(wrong, spread, w)
    except ValueError as err:
        assert ("rank 0: x must be" if rank == 0 else "ranks [0] passed invalid inputs") in str(err), str(err)
    else:
        raise AssertionError("invalid input on rank 0 did not raise on every rank")
    expert_x, _, handle = rdep.dispatch(x, spread, w)
    torch.testing.assert_close(rdep.combine(expert_x, handle), 2 * x)
    rdep.check()


def check_skewed_round_trips(rank: int, world: int, device, transport, rounds: int = 40) -> None:
    cfg = exact_config(world)
    rdep = Rdep(cfg, transport)
    gen = torch.Generator(device).manual_seed(500 + rank)
    dice = torch.Generator().manual_seed(900 + rank)  # host-side: sizes and delays differ per rank
    worst = torch.zeros((), device=device)

    def maybe_sleep():
        if float(torch.rand((), generator=dice)) < 0.5:
            torch.cuda._sleep(int(torch.randint(0, 4_000_000, (), generator=dice)))  # up to ~2 ms of GPU time

    with forbid_collectives():
        for step in range(rounds):
            n_tokens = int(torch.randint(0, cfg.max_tokens_per_rank + 1, (), generator=dice))
            x = torch.randn(n_tokens, cfg.dim, generator=gen, device=device, requires_grad=True)
            ids, w = routing(gen, n_tokens, cfg.n_routed_experts, cfg.top_k, device)
            w.requires_grad_()
            scale = float(step + 1)
            maybe_sleep()
            expert_x, _, handle = rdep.dispatch(x, ids, w)
            maybe_sleep()
            y = rdep.combine(expert_x * scale, handle)
            maybe_sleep()
            y.backward(torch.ones_like(y))
            if n_tokens == 0:  # an empty rank still takes part in every phase; nothing to compare
                continue
            errors = [
                (y - scale * x * w.sum(1, keepdim=True)).abs().amax(),
                (x.grad - scale * w.sum(1, keepdim=True)).abs().amax(),
                (w.grad - scale * x.sum(1, keepdim=True)).abs().amax() / cfg.dim,
            ]
            worst = torch.maximum(worst, torch.stack([e.detach() for e in errors] + [worst]).amax())
        torch.cuda.synchronize()
    rdep.check()
    assert float(worst) < 1e-3, f"rank {rank}: skewed round trips off by {float(worst):.3e}"


def main() -> None:
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")  # never create NVLink multicast objects
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    gpus = torch.cuda.device_count()
    # More ranks than GPUs: several NVSHMEM PEs share a GPU (NVSHMEM's limited multi-process-per-GPU mode:
    # point-to-point and barrier_all only). NCCL refuses two ranks on one GPU, so torch.distributed uses gloo.
    shared = world_size > gpus
    device = torch.device("cuda", local_rank % gpus)
    torch.cuda.set_device(device)
    if shared:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    transport = NvshmemTransport.for_config(
        exact_config(world), exact_config(world), moe_config(world), *overflow_configs(world)
    )
    checks = [
        ("collective guard intercepts", check_guard_works),
        ("exact fp32 transport fwd+bwd", lambda: check_exact_transport(rank, world, device, transport)),
        ("bf16 MoE layer == single-GPU reference fwd+bwd", lambda: check_moe_layer(rank, world, device, transport)),
        (
            "overflow raises, dropped slots are not sent and are counted, one rank's bad input raises everywhere",
            lambda: check_overflow_and_drop(rank, world, device, transport),
        ),
        (
            "40 skewed back-to-back fwd+bwd round trips exact",
            lambda: check_skewed_round_trips(rank, world, device, transport),
        ),
    ]
    for name, check in checks:
        check()
        dist.barrier()
        if rank == 0:
            print(f"PASS world={world}{' (shared GPU)' if shared else ''}: {name}", flush=True)
    transport.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
