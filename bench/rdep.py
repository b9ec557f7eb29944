"""RDEP dispatch + combine vs the all-to-all expert-parallel path, side by side in one run.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) \
      torchrun --standalone --nproc_per_node=N bench/rdep.py [--shapes moonlight,dsv3] [--tokens 4096,16384,65536]

N = 2, 4 or 8 GPUs of one NVLink domain, nvshmem4py installed. Per shape and tokens-per-GPU, the
same tokens and routing go through
- rdep: nmoe.rdep dispatch -> (identity experts) -> combine;
- a2a:  the torchtitan / Megatron path: sort by expert, count exchange (all_to_all_single), host
        split sizes, permute, all_to_all_single, owner-side regroup by local expert, identity
        experts, inverse regroup, all_to_all_single back, un-permute, weighted sum over k;
each forward only and forward + backward. Latency is the max over ranks of the per-rank median
(CUDA events, ranks aligned by a barrier before every iteration). GB/s per GPU counts the bytes
each GPU sends to other GPUs (rows whose owner is another rank, both directions, x2 for the
backward), divided by the latency, next to the one-direction peer-copy bandwidth measured in the
same run (each GPU copies into the next GPU's symmetric buffer, all at once). Results are merged
by world size into bench/results/rdep.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from nmoe.kernels import sort_by_expert
from nmoe.rdep import NvshmemTransport, Rdep, RdepConfig
from nmoe.rdep.nvshmem import HEAP_SLACK_BYTES, required_heap_bytes

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"moonlight": (2048, 64, 6), "dsv3": (7168, 256, 8)}  # hidden, routed experts, top-k
PEER_COPY_BYTES = 1 << 30


@dataclass
class Row:
    shape: str
    hidden: int
    experts: int
    top_k: int
    tokens_per_gpu: int
    path: str
    fwd_ms: float
    fwd_bwd_ms: float
    remote_bytes_fwd: int  # bytes this GPU sends to other GPUs in one forward (max over ranks)
    fwd_GBps: float
    fwd_bwd_GBps: float
    fraction_of_peer_copy_fwd_bwd: float


def routing(n_tokens: int, n_experts: int, top_k: int, seed: int, device):
    gen = torch.Generator(device).manual_seed(seed)
    ids = torch.rand(n_tokens, n_experts, generator=gen, device=device).topk(top_k, dim=1).indices
    weights = torch.softmax(torch.rand(n_tokens, top_k, generator=gen, device=device), dim=1)
    return ids, weights


def a2a_moe(x, ids, w, world: int, n_experts: int):
    """The all-to-all EP path with identity experts, all permutation work included; autograd-aware."""
    n_tokens, top_k = ids.shape
    per_rank = n_experts // world
    routed = sort_by_expert(ids, n_experts)
    counts = routed.counts.to(torch.int64)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts)  # [src][local expert] counts for this owner
    send_splits = counts.view(world, per_rank).sum(1).tolist()  # host sync, as in torchtitan
    recv_splits = recv_counts.view(world, per_rank).sum(1).tolist()
    permuted = x.index_select(0, routed.order // top_k)
    # torchtitan's autograd all-to-all (functional collectives; waits happen on first use)
    received = funcol.all_to_all_single_autograd(permuted, recv_splits, send_splits, dist.group.WORLD)
    local_expert = torch.arange(per_rank, device=x.device).repeat(world)
    row_expert = torch.repeat_interleave(local_expert, recv_counts, output_size=received.shape[0])
    regroup = torch.sort(row_expert, stable=True).indices
    expert_x = received.index_select(0, regroup)
    expert_y = expert_x  # identity experts: the benchmark measures movement only
    back = torch.empty_like(regroup)
    back[regroup] = torch.arange(regroup.numel(), device=x.device)
    returned = funcol.all_to_all_single_autograd(
        expert_y.index_select(0, back), send_splits, recv_splits, dist.group.WORLD
    )
    unsort = torch.empty_like(routed.order)
    unsort[routed.order] = torch.arange(routed.order.numel(), device=x.device)
    per_slot = returned.index_select(0, unsort).view(n_tokens, top_k, -1)
    return (per_slot * w.to(per_slot.dtype)[..., None]).sum(1)


def rdep_moe(rdep: Rdep, x, ids, w):
    expert_x, _, handle = rdep.dispatch(x, ids, w)
    return rdep.combine(expert_x, handle)


def median_ms(fn, iters: int, warmup: int) -> float:
    """Max over ranks of the per-rank median latency of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return max_over_ranks(statistics.median(times))


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def peer_copy_GBps(transport: NvshmemTransport, iters: int) -> float:
    """One-direction bandwidth of a plain copy into the next rank's symmetric buffer (all ranks at once)."""
    buf = transport.symmetric("bench.peer_copy", (PEER_COPY_BYTES,), torch.uint8)
    src = torch.full((PEER_COPY_BYTES,), 7, dtype=torch.uint8, device=transport.device)
    peer = (transport.rank + 1) % transport.world
    target = transport.peer_view(buf.local, peer)
    ms = median_ms(lambda: target.copy_(src), iters, warmup=3)
    return PEER_COPY_BYTES / ms / 1e6


def measure(fn, x, w, iters: int) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of y = fn(x, w)."""

    def forward():
        with torch.no_grad():
            fn(x, w)

    def forward_backward():
        y = fn(x.detach().requires_grad_(), w.detach().requires_grad_())
        y.backward(torch.ones_like(y))

    return median_ms(forward, iters, warmup=3), median_ms(forward_backward, iters, warmup=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="moonlight,dsv3")
    parser.add_argument("--tokens", default="4096,16384,65536")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--capacity-margin", type=float, default=1.5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "rdep.json"))
    args = parser.parse_args()
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")  # never create NVLink multicast objects

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = [s for s in args.shapes.split(",") if s]
    token_counts = [int(t) for t in args.tokens.split(",") if t]
    configs = {
        name: RdepConfig(
            dim=SHAPES[name][0],
            n_routed_experts=SHAPES[name][1],
            top_k=SHAPES[name][2],
            max_tokens_per_rank=max(token_counts),
            capacity_margin=args.capacity_margin,
            wait_timeout_s=120.0,
        )  # a lost signal fails the run instead of hanging it
        for name in shapes
    }
    heap = sum(required_heap_bytes(c, world) for c in configs.values()) + PEER_COPY_BYTES + HEAP_SLACK_BYTES
    transport = NvshmemTransport(heap_bytes=heap)
    peer_GBps = peer_copy_GBps(transport, args.iters)
    rows: list[Row] = []
    for name in shapes:
        rdep = Rdep(configs[name], transport)
        for n_tokens in token_counts:
            rows += bench_one(name, rdep, n_tokens, peer_GBps, args.iters)
        rdep.check()  # raises RdepTimeoutError if a device-side wait gave up
    if rank == 0:
        write_results(Path(args.out), world, peer_GBps, rows)
        print(markdown(world, peer_GBps, rows), flush=True)
    transport.close()
    dist.destroy_process_group()


def bench_one(name: str, rdep: Rdep, n_tokens: int, peer_GBps: float, iters: int) -> list[Row]:
    """Both paths on one shape and token count: outputs checked equal, then timed."""
    cfg, rank, world, device = rdep.config, rdep.rank, rdep.world, rdep.transport.device
    x = torch.randn(n_tokens, cfg.dim, device=device, dtype=torch.bfloat16)
    ids, w = routing(n_tokens, cfg.n_routed_experts, cfg.top_k, seed=1000 * rank + n_tokens, device=device)
    owner = ids // (cfg.n_routed_experts // world)
    remote_rows = int(max_over_ranks(float((owner != rank).sum())))
    remote_bytes = 2 * remote_rows * cfg.dim * x.element_size()  # dispatch + combine
    paths = {
        "rdep": lambda xx, ww: rdep_moe(rdep, xx, ids, ww),
        "a2a": lambda xx, ww: a2a_moe(xx, ids, ww, world, cfg.n_routed_experts),
    }
    with torch.no_grad():
        torch.testing.assert_close(paths["rdep"](x, w).float(), paths["a2a"](x, w).float(), rtol=2e-2, atol=2e-2)
    rows = []
    for path, fn in paths.items():
        fwd_ms, fwd_bwd_ms = measure(fn, x, w, iters)
        fwd_bwd_GBps = 2 * remote_bytes / fwd_bwd_ms / 1e6
        rows.append(
            Row(
                name,
                cfg.dim,
                cfg.n_routed_experts,
                cfg.top_k,
                n_tokens,
                path,
                fwd_ms,
                fwd_bwd_ms,
                remote_bytes,
                remote_bytes / fwd_ms / 1e6,
                fwd_bwd_GBps,
                fwd_bwd_GBps / peer_GBps,
            )
        )
    if rank == 0:
        r, a = rows
        print(
            f"{name} T={n_tokens}: rdep {r.fwd_ms:.3f}/{r.fwd_bwd_ms:.3f} ms, a2a {a.fwd_ms:.3f}/"
            f"{a.fwd_bwd_ms:.3f} ms (fwd/fwd+bwd); speedup {a.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x; rdep "
            f"{r.fwd_bwd_GBps:.0f} GB/s = {100 * r.fraction_of_peer_copy_fwd_bwd:.0f}% of peer copy "
            f"{peer_GBps:.0f} GB/s",
            flush=True,
        )
    return rows


def write_results(out: Path, world: int, peer_GBps: float, rows: list[Row]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[f"world_{world}"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "world": world,
        "torch": torch.__version__,
        "peer_copy_GBps_one_direction": peer_GBps,
        "rows": [asdict(r) for r in rows],
    }
    out.write_text(json.dumps(data, indent=2) + "\n")


def markdown(world: int, peer_GBps: float, rows: list[Row]) -> str:
    lines = [
        f"RDEP vs all-to-all, {world} GPUs, peer copy {peer_GBps:.0f} GB/s one direction",
        "",
        "| shape | tokens/GPU | rdep fwd ms | a2a fwd ms | rdep fwd+bwd ms | a2a fwd+bwd ms | speedup fwd+bwd "
        "| rdep GB/s | % of peer copy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r, a in zip(rows[::2], rows[1::2]):
        lines.append(
            f"| {r.shape} | {r.tokens_per_gpu} | {r.fwd_ms:.3f} | {a.fwd_ms:.3f} | {r.fwd_bwd_ms:.3f} | "
            f"{a.fwd_bwd_ms:.3f} | {a.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x | {r.fwd_bwd_GBps:.0f} | "
            f"{100 * r.fraction_of_peer_copy_fwd_bwd:.0f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
