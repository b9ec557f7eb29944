"""Where the fp8 expert MLP's time goes, kernel by kernel, beside the bf16 paths (one CUDA GPU).

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python3 bench/fp8_profile.py --out bench/results/fp8_profile.json

The expert MLP forward + backward on moonlet's shape (98,304 grouped rows, 64 experts, D 1024, H 704) and
speedrun-256's: the bf16 fused op (`expert_mlp`, what LocalDispatch runs), the composed bf16 path, and
`expert_mlp_fp8` per recipe (scaling, fp8 or bf16 dW, fast accumulation). Then, on moonlet, the CUDA time per
iteration of every kernel (torch.profiler), each fp8 GEMM alone on pre-quantised operands and each quantiser.
Prints a markdown summary last.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
from pathlib import Path

import torch
import triton

import nmoe.kernels as nk
from nmoe.kernels import _lowprec_ops as ops
from nmoe.kernels import _quack_gemm, _triton_ops, reference


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def capture_graph(fn) -> torch.cuda.CUDAGraph | None:
    """fn captured in a CUDA graph after three warm-up calls (autotuning, allocations); None, with the reason
    printed, when fn cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        print(f"graph capture failed: {err}", flush=True)
        return None
    return graph


def graph_ms(fn) -> float | None:
    """Median ms of fn replayed from a CUDA graph: its GPU time without the host's launch overhead."""
    graph = capture_graph(fn)
    return None if graph is None else bench_ms(graph.replay)


GRAPH_ROUNDS = 7


def interleaved_graph_ms(fns: dict) -> dict:
    """{name: (median ms, [ms per round])} of each fn replayed from its CUDA graph, the paths taking turns for
    GRAPH_ROUNDS rounds: a clock or thermal drift during the run shifts every path alike instead of one."""
    graphs = {name: capture_graph(fn) for name, fn in fns.items()}
    rounds: dict = {name: [] for name, g in graphs.items() if g is not None}
    for _ in range(GRAPH_ROUNDS):
        for name in rounds:
            rounds[name].append(bench_ms(graphs[name].replay))
    return {name: (sorted(ms)[len(ms) // 2], ms) for name, ms in rounds.items()}


def kernel_table(fn, iters: int = 5) -> list[tuple[str, float, int]]:
    """(kernel name, CUDA ms per iteration, launches per iteration), largest first."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name[:90]] += event.device_time_total / 1e3 / iters
            count[event.name[:90]] += 1
    return sorted(((k, v, count[k] // iters) for k, v in total.items()), key=lambda r: -r[1])


SHAPES = {"moonlet": (16384, 6, 64, 1024, 704), "speedrun-256": (16384, 8, 256, 1024, 512)}
RECIPES = {  # expert_mlp_fp8 keyword arguments
    "fp8 rowwise": dict(scaling="rowwise"),
    "fp8 blockwise": dict(scaling="blockwise"),
    "fp8 rowwise, bf16 dW": dict(scaling="rowwise", wgrad_fp8=False),
    "fp8 rowwise fast, fp8 dW": dict(scaling="rowwise", fast_accum=True),
    "fp8 rowwise fast, bf16 dW": dict(scaling="rowwise", wgrad_fp8=False, fast_accum=True),
}
PROFILED = ("bf16 fused (expert_mlp)", "fp8 rowwise fast, bf16 dW", "fp8 rowwise fast, bf16 dW, TMA")
DEFAULT_FP8 = dict(scaling="rowwise", wgrad_fp8=True, fast_accum=True)  # the model's fp8 recipe
MASTERS_BF16 = "bf16 moe_experts, float32 masters cast inside (the model's bf16 layer)"
MASTERS_FP8 = "fp8 moe_experts_fp8, float32 masters quantised (the model's fp8 layer)"
MASTERS_FP8_BF16_DW = "fp8 moe_experts_fp8 with bf16 dW (the default before 2026-11-25), float32 masters"
MASTERS_FP8_TRITON = "fp8 moe_experts_fp8, Triton GEMMs only (no CUTLASS picks), float32 masters"
MASTERS_FP8_NO_QUACK = "fp8 moe_experts_fp8, torch's CUTLASS picks but no quack (before 2026-11-25, sixth stop)"
MOE_PROFILED = ("bf16 moe_experts", "fp8 moe_experts_fp8", MASTERS_BF16, MASTERS_FP8, MASTERS_FP8_TRITON)
GRAPHED = (MASTERS_BF16, MASTERS_FP8, MASTERS_FP8_TRITON, MASTERS_FP8_NO_QUACK)  # from CUDA graphs, taking turns


def expert_mlp_paths(tokens, top_k, n_experts, d, h):
    """(fwd+bwd closures by path name, FLOPs of one fwd+bwd, the leaves) on random balanced routing."""
    m = tokens * top_k
    ids = torch.rand(tokens, n_experts, device="cuda").topk(top_k, dim=1).indices
    offsets = nk.sort_by_expert(ids, n_experts).offsets
    rows = torch.randn(m, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_up = (torch.randn(n_experts, d, 2 * h, device="cuda", dtype=torch.bfloat16) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, device="cuda", dtype=torch.bfloat16) / h**0.5).requires_grad_()
    dy = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    leaves = (rows, w_up, w_down)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), leaves, dy)

    paths = {
        "bf16 fused (expert_mlp)": step(lambda: nk.expert_mlp(rows, offsets, w_up, w_down)),
        "bf16 composed": step(
            lambda: nk.grouped_mm(reference.swiglu(nk.grouped_mm(rows, w_up, offsets)), w_down, offsets)
        ),
    }
    for name, kwargs in RECIPES.items():
        paths[name] = step(lambda kw=kwargs: nk.expert_mlp_fp8(rows, offsets, w_up, w_down, **kw))

    def tma(fn):
        def run():
            with _triton_ops.use_gemm_variant("tma"):
                return fn()

        return run

    paths["fp8 rowwise fast, bf16 dW, TMA"] = tma(paths["fp8 rowwise fast, bf16 dW"])
    paths["bf16 fused, TMA"] = tma(paths["bf16 fused (expert_mlp)"])
    return paths, 3 * 2.0 * m * d * 3 * h, (offsets, rows, w_up, w_down)


def moe_paths(tokens, top_k, n_experts, d, h):
    """The routed experts as the model runs them (gather, expert MLP, weighted combine), fwd+bwd closures by name:
    bf16 moe_experts, the fused moe_experts_fp8 and the composition LocalDispatch ran for fp8 before it."""
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.rand(tokens, n_experts, device="cuda").topk(top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, device="cuda", requires_grad=True)
    w_up = (torch.randn(n_experts, d, 2 * h, device="cuda", dtype=torch.bfloat16) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, device="cuda", dtype=torch.bfloat16) / h**0.5).requires_grad_()
    dy = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    leaves = (x, weights, w_up, w_down)
    # as MoE layers run them: float32 master weights, cast for the bf16 GEMMs, quantised straight for fp8
    masters = (w_up.detach().float().requires_grad_(), w_down.detach().float().requires_grad_())
    master_leaves = (x, weights, *masters)

    def composed():
        routing = nk.sort_by_expert(ids, n_experts)
        token = routing.order // top_k
        out = nk.expert_mlp_fp8(x[token], routing.offsets, w_up, w_down, **DEFAULT_FP8)
        slot = weights.reshape(-1)[routing.order]
        return torch.zeros_like(x).index_add(0, token, out * slot[:, None].to(out.dtype))

    def step(fn, wrt=leaves):
        return lambda: torch.autograd.grad(fn(), wrt, dy)

    def triton_only(fn):
        def run():
            with ops.use_fp8_gemm_kernel("triton"):
                return fn()

        return run

    def without_quack(fn):
        def run():
            real = _quack_gemm.missing
            _quack_gemm.missing = lambda: "left out of this row"
            try:
                return fn()
            finally:
                _quack_gemm.missing = real

        return run

    return {
        "bf16 moe_experts": step(lambda: nk.moe_experts(x, ids, weights, w_up, w_down)),
        "fp8 moe_experts_fp8": step(lambda: nk.moe_experts_fp8(x, ids, weights, w_up, w_down, **DEFAULT_FP8)),
        "fp8 gather, expert_mlp_fp8, index_add (before)": step(composed),
        MASTERS_BF16: step(lambda: nk.moe_experts(x, ids, weights, *masters), master_leaves),
        MASTERS_FP8: step(lambda: nk.moe_experts_fp8(x, ids, weights, *masters, **DEFAULT_FP8), master_leaves),
        MASTERS_FP8_BF16_DW: step(
            lambda: nk.moe_experts_fp8(x, ids, weights, *masters, **dict(DEFAULT_FP8, wgrad_fp8=False)), master_leaves
        ),
        MASTERS_FP8_TRITON: triton_only(
            step(lambda: nk.moe_experts_fp8(x, ids, weights, *masters, **DEFAULT_FP8), master_leaves)
        ),
        MASTERS_FP8_NO_QUACK: without_quack(
            step(lambda: nk.moe_experts_fp8(x, ids, weights, *masters, **DEFAULT_FP8), master_leaves)
        ),
    }


def gemm_only(offsets, rows, w_up, w_down, h) -> dict:
    """Each fp8 GEMM alone on pre-quantised operands (TFLOP/s) and each quantiser alone (ms)."""
    m, d = rows.shape
    x = rows.detach()
    result = {}
    for label, k, n, a, b in (
        ("up", d, 2 * h, x, w_up.detach()),
        ("down", h, d, x[:, :h].contiguous(), w_down.detach()),
    ):
        g = 2.0 * m * k * n
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        cells = {}
        for scaling in ("rowwise", "blockwise"):
            blockwise = scaling == "blockwise"
            qa, sa = ops.quantize_rows(a, blockwise)
            wop = ops.quantize_weight(b, blockwise, "fwd")
            cells[scaling] = g / bench_ms(lambda: ops.gemm(qa, sa, blockwise, wop, offsets, out, n, k)) / 1e9
            if not blockwise:
                cells["rowwise fast"] = (
                    g / bench_ms(lambda: ops.gemm(qa, sa, False, wop, offsets, out, n, k, fast=True)) / 1e9
                )
                with _triton_ops.use_gemm_variant("tma"):
                    cells["rowwise fast TMA"] = (
                        g / bench_ms(lambda: ops.gemm(qa, sa, False, wop, offsets, out, n, k, fast=True)) / 1e9
                    )
                fn = getattr(torch, "_scaled_grouped_mm", None)
                if fn is not None:
                    wt = wop.q.transpose(1, 2)

                    def torch_fast():
                        return fn(qa, wt, sa, wop.scales, offs=offsets, out_dtype=torch.bfloat16, use_fast_accum=True)

                    cells["torch fast"] = g / bench_ms(torch_fast) / 1e9
        cells["bf16"] = g / bench_ms(lambda: nk.grouped_mm(a, b, offsets)) / 1e9
        cells["bf16 dW"] = g / bench_ms(lambda: ops.wgrad_in_input_dtype(a, out, offsets, torch.bfloat16)) / 1e9
        cells["fp8 dW blockwise incl. quantisation"] = (
            g / bench_ms(lambda: ops.wgrad(a, out, offsets, torch.bfloat16, True)) / 1e9
        )
        cells["fp8 dW rowwise fast incl. quantisation"] = (
            g / bench_ms(lambda: ops.wgrad(a, out, offsets, torch.bfloat16, False, True)) / 1e9
        )
        qa, sa = ops.quantize_dw_cols(a, offsets)
        qb, sb = ops.quantize_dw_cols(out, offsets)
        cells["fp8 dW rowwise fast"] = (
            g / bench_ms(lambda: ops.wgrad_codes(qa, sa, qb, sb, offsets, torch.bfloat16, True, True)) / 1e9
        )
        qr, sr = ops.quantize_rows(a, False)
        cells["quantise dW cols (ms)"] = bench_ms(lambda: ops.quantize_dw_cols(a, offsets))
        cells["requantise codes per dW col (ms)"] = bench_ms(lambda: ops.quantize_dw_cols(qr, offsets, x_scales=sr))
        cells["transpose grouped codes (ms)"] = bench_ms(lambda: ops.transpose_grouped_codes(qr, offsets))
        cells["quantise rows rowwise (ms)"] = bench_ms(lambda: ops.quantize_rows(a, False))
        cells["quantise rows blockwise (ms)"] = bench_ms(lambda: ops.quantize_rows(a, True))
        cells["quantise weight rowwise fwd (ms)"] = bench_ms(lambda: ops.quantize_weight(b, False, "fwd"))
        cells["quantise weight rowwise dgrad (ms)"] = bench_ms(lambda: ops.quantize_weight(b, False, "dgrad"))
        cells["quantise weight blockwise fwd (ms)"] = bench_ms(lambda: ops.quantize_weight(b, True, "fwd"))
        result[label] = cells
        print(label, json.dumps(cells), flush=True)
    return result


def quantiser_sweep(x, w_up, w_down) -> dict:
    """ms of the row quantiser per ONE_PASS_ELEMENTS and of the forward weight quantiser per ONE_PASS_SLAB (0: the
    two-pass kernels), to pick the launch sizes."""
    saved = ops.ONE_PASS_ELEMENTS, ops.ONE_PASS_SLAB, ops.TRANSPOSE_BLOCK
    out = {}
    pre = torch.randn(x.shape[0], 1408, device="cuda", dtype=torch.bfloat16)
    act = torch.randn(x.shape[0], 704, device="cuda", dtype=torch.bfloat16)
    try:
        for elements in (0, 1024, 2048, 4096, 8192):
            ops.ONE_PASS_ELEMENTS = elements
            out[f"rows x 1024, elements {elements}"] = bench_ms(lambda: ops.quantize_rows(x, False))
            out[f"rows d_pre 1408, elements {elements}"] = bench_ms(lambda: ops.quantize_rows(pre, False))
            out[f"rows swiglu 704, elements {elements}"] = bench_ms(lambda: ops.quantize_rows(pre, False, True))
            out[f"rows act 704, elements {elements}"] = bench_ms(lambda: ops.quantize_rows(act, False))
            out[f"w_up dgrad (rows 1408), elements {elements}"] = bench_ms(
                lambda: ops.quantize_weight(w_up, False, "dgrad")
            )
        ops.ONE_PASS_ELEMENTS = saved[0]
        w_up32, w_down32 = w_up.float(), w_down.float()  # the model's float32 masters
        for slab in (0, 8192, 16384, 32768):
            ops.ONE_PASS_SLAB = slab
            out[f"w_up fwd, slab {slab}"] = bench_ms(lambda: ops.quantize_weight(w_up, False, "fwd"))
            out[f"w_down fwd, slab {slab}"] = bench_ms(lambda: ops.quantize_weight(w_down, False, "fwd"))
            out[f"w_up fwd (fp32), slab {slab}"] = bench_ms(lambda: ops.quantize_weight(w_up32, False, "fwd"))
        ops.ONE_PASS_SLAB = saved[1]
        out["w_up once, both layouts (fp32)"] = bench_ms(lambda: ops.quantize_weight_both(w_up32, False, ops.UP_FOLD))
        out["w_down once, both layouts (fp32)"] = bench_ms(
            lambda: ops.quantize_weight_both(w_down32, False, ops.DOWN_FOLD)
        )
        q_up = ops.quantize_weight_both(w_up32, False, ops.UP_FOLD)[0]
        for block in (32, 64, 128):
            ops.TRANSPOSE_BLOCK = block
            out[f"transpose w_up codes, block {block}"] = bench_ms(lambda: ops.transpose_codes(q_up))
        ops.TRANSPOSE_BLOCK = saved[2]
        out.update(swiglu_sweep(x.shape[0], w_up.shape[0], w_down.shape[1]))
    finally:
        ops.ONE_PASS_ELEMENTS, ops.ONE_PASS_SLAB, ops.TRANSPOSE_BLOCK = saved
    for k, v in out.items():
        print(f"sweep {k}: {v:.4f} ms", flush=True)
    return out


def dw_cols_sweep(tokens: int, top_k: int, n_experts: int, d: int) -> dict:
    """CUDA-graph ms of the routed dW column quantiser as _dw_down (token-order codes gathered top-k, times row
    scales, a row multiplier and a routing weight) and _dw_up (no routing weight) call it, per columns per program
    and warps."""
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    codes, row_scales = ops.quantize_rows(x, False)
    ids = torch.rand(tokens, n_experts, device="cuda").topk(top_k, dim=1).indices
    routing, token, pos = _triton_ops.route(ids, n_experts)
    mult, weights = torch.rand(tokens * top_k, device="cuda"), torch.rand(tokens * top_k, device="cuda")
    offsets, order = routing.offsets, routing.order
    saved = ops.DW_COLS_BLOCK, ops.DW_COLS_WARPS
    out = {}
    try:
        for block in (32, 64, 128):
            for warps in (2, 4, 8):
                ops.DW_COLS_BLOCK, ops.DW_COLS_WARPS = block, warps
                out[f"dW cols as dy, block {block}, warps {warps}"] = graph_ms(
                    lambda: ops.quantize_dw_cols(codes, offsets, token, mult, weights, order, row_scales, pos=pos)
                )
                out[f"dW cols as x, block {block}, warps {warps}"] = graph_ms(
                    lambda: ops.quantize_dw_cols(codes, offsets, token, mult, x_scales=row_scales, pos=pos)
                )
    finally:
        ops.DW_COLS_BLOCK, ops.DW_COLS_WARPS = saved
    return out


def swiglu_sweep(m: int, n_experts: int, h: int) -> dict:
    """ms of swiglu_backward_rows (weighted; quantised as the fp8 layer runs it, or not as the bf16 one) per float32
    elements per program and warps."""
    from nmoe.kernels import _triton_ops as T

    d_act = torch.randn(m, h, device="cuda")
    pre = torch.randn(m, 2 * h, device="cuda", dtype=torch.bfloat16)
    offsets = torch.linspace(m / n_experts, m, n_experts, device="cuda").to(torch.int32)
    weights, order = torch.rand(m, device="cuda"), torch.randperm(m, device="cuda")
    d_weights = torch.zeros(m, device="cuda")
    saved = T.SWIGLU_BWD_ELEMENTS, T.SWIGLU_BWD_WARPS
    out = {}
    try:
        for elements in (4096, 8192, 16384):
            for warps in (4, 8):
                T.SWIGLU_BWD_ELEMENTS, T.SWIGLU_BWD_WARPS = elements, warps
                out[f"swiglu_bwd fp8, elements {elements}, warps {warps}"] = bench_ms(
                    lambda: T.swiglu_backward_rows(d_act, pre, offsets, weights, order, d_weights, True)
                )
                out[f"swiglu_bwd bf16, elements {elements}, warps {warps}"] = bench_ms(
                    lambda: T.swiglu_backward_rows(d_act, pre, offsets, weights, order, d_weights)
                )
    finally:
        T.SWIGLU_BWD_ELEMENTS, T.SWIGLU_BWD_WARPS = saved
    return out


def launch_sequence(fn) -> list[tuple[str, float]]:
    """(kernel name, CUDA ms) of every launch of one iteration, in launch order (which GEMM is which)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name[:60], e.device_time_total / 1e3) for e in events if e.device_time_total > 5]


def host_costs(paths: dict, iters: int = 8) -> dict:
    """Host ms per fwd+bwd (time to enqueue `iters` iterations on an idle GPU, / iters) by path, and the fp8 path's
    top Python functions by own time (cProfile): the launch overhead that starves the GPU in eager training."""
    import cProfile
    import io
    import pstats
    import time

    out: dict = {}
    for name, fn in paths.items():
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
        torch.cuda.synchronize()
        out[name] = min(times)
    prof = cProfile.Profile()
    fp8 = paths[MASTERS_FP8]
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(iters):
        fp8()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    out["cprofile_fp8"] = text.getvalue()
    return out


def tuned_configs() -> dict:
    """The fp8 GEMM autotuners' picks: {kernel: {key: config}}."""
    picks = {f"gmm epilogue {e}": {str(k): str(c) for k, c in t.cache.items()} for e, t in ops._GMM.items()}
    picks.update(
        {f"gmm TMA epilogue {e}": {str(k): str(c) for k, c in t.cache.items()} for e, t in ops._GMM_TMA.items()}
    )
    picks["gmm_dw"] = {str(k): str(c) for k, c in ops._GMM_DW.cache.items()}
    picks["cutlass picked (N, K, E, gathered)"] = {str((*k[:3], k[5])): v for k, v in ops.CUTLASS_PICKS.items()}
    return picks


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="also time the quantisers per launch size")
    parser.add_argument("--only-sweep-dw", action="store_true", help="only time the dW column quantiser per launch")
    parser.add_argument("--host", action="store_true", help="also time the host side of the routed experts")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    args = parser.parse_args()
    result: dict = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.date.today().isoformat(),
        command="python3 bench/fp8_profile.py (bash bench/gpu.sh fp8-profile)",
        mlp={},
        kernels={},
        gemm_only={},
    )
    if args.only_sweep_dw:
        result["sweep_dw"] = dw_cols_sweep(*SHAPES["moonlet"][:4])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        for k, v in result["sweep_dw"].items():
            print(f"sweep {k}: {v:.4f} ms", flush=True)
        return 0
    for shape, dims in SHAPES.items():
        if shape not in args.shapes.split(","):
            continue
        torch.manual_seed(0)
        paths, flop, tensors = expert_mlp_paths(*dims)
        result["mlp"][shape] = {}
        for name, fn in paths.items():
            ms = bench_ms(fn)
            result["mlp"][shape][name] = dict(ms=ms, tflops=flop / ms / 1e9)
            print(shape, name, f"{ms:.3f} ms", flush=True)
        result.setdefault("moe", {})[shape] = {}
        moe = moe_paths(dims[0], dims[1], dims[2], dims[3], dims[4])
        if args.host and shape == "moonlet":
            result["host_ms"] = host_costs({k: moe[k] for k in MOE_PROFILED})
            print(result["host_ms"].pop("cprofile_fp8"), flush=True)
        for name, fn in moe.items():
            ms = bench_ms(fn)
            result["moe"][shape][name] = dict(ms=ms, tflops=flop / ms / 1e9)
            print(shape, name, f"{ms:.3f} ms", flush=True)
            if shape == "moonlet" and name in MOE_PROFILED:
                result["kernels"][name] = kernel_table(fn)
            if shape == "moonlet" and name in GRAPHED[:3]:
                result.setdefault("launches", {})[name] = launch_sequence(fn)
        if shape == "moonlet":
            timed = interleaved_graph_ms({name: moe[name] for name in GRAPHED})
            result["graph_ms"] = {name: ms for name, (ms, _) in timed.items()}
            result["graph_rounds_ms"] = {name: rounds for name, (_, rounds) in timed.items()}
            for name, (ms, rounds) in timed.items():
                print(shape, name, f"CUDA graph {ms:.3f} ms (rounds {', '.join(f'{r:.3f}' for r in rounds)})")
        if shape == "moonlet":
            for name in PROFILED:
                result["kernels"][name] = kernel_table(paths[name])
            result["gemm_only"] = gemm_only(*tensors, dims[-1])
            if args.sweep:
                offsets, rows, w_up, w_down = tensors
                result["sweep"] = quantiser_sweep(rows.detach(), w_up.detach(), w_down.detach())
        del paths, tensors
        torch.cuda.empty_cache()
    result["tuned"] = tuned_configs()
    print(json.dumps(result["tuned"], indent=1), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    lines = [f"{result['device']}, {result['date']}"]
    for shape, paths in result["mlp"].items():
        base = paths["bf16 fused (expert_mlp)"]["ms"]
        lines += [
            "",
            f"{shape}: expert MLP fwd+bwd",
            "",
            "| path | ms | TFLOP/s | vs bf16 fused |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {k} | {v['ms']:.3f} | {v['tflops']:.0f} | {base / v['ms']:.2f}x |" for k, v in paths.items()]
    for shape, paths in result.get("moe", {}).items():
        base = paths["bf16 moe_experts"]["ms"]
        lines += [
            "",
            f"{shape}: routed experts (gather, expert MLP, weighted combine) fwd+bwd",
            "",
            "| path | ms | TFLOP/s | vs bf16 moe_experts |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {k} | {v['ms']:.3f} | {v['tflops']:.0f} | {base / v['ms']:.2f}x |" for k, v in paths.items()]
        for name in (MASTERS_FP8, MASTERS_FP8_BF16_DW, MASTERS_FP8_TRITON, MASTERS_FP8_NO_QUACK):
            if name in paths:
                ratio = paths[MASTERS_BF16]["ms"] / paths[name]["ms"]
                lines += ["", f"{shape}: {name} vs the model's bf16 layer: {ratio:.2f}x"]
    graphs = result.get("graph_ms", {})
    if graphs.get(MASTERS_BF16):
        rounds = result["graph_rounds_ms"]
        lines += ["", "moonlet: as MoE layers run them, replayed from CUDA graphs (no host overhead), median of "
                  f"{GRAPH_ROUNDS} rounds taking turns", ""]  # fmt: skip
        lines += ["| path | ms | vs the model's bf16 layer | range over rounds |", "| --- | --- | --- | --- |"]
        for name, ms in graphs.items():
            ratios = [b / v for b, v in zip(rounds[MASTERS_BF16], rounds[name])]
            span = f"{min(ratios):.3f}-{max(ratios):.3f}x"
            lines += [f"| {name} | {ms:.3f} | {graphs[MASTERS_BF16] / ms:.3f}x | {span} |"]
    for name, table in result["kernels"].items():
        lines += ["", f"{name}: ms per iteration by kernel", ""]
        lines += [f"  {ms:7.3f} x{n:<2d} {k}" for k, ms, n in table[:12]]
    for name, seq in result.get("launches", {}).items():
        lines += ["", f"{name}: launches of one fwd+bwd over 5 us, in order", ""]
        lines += [f"  {ms:7.3f}  {k}" for k, ms in seq]
    if "host_ms" in result:
        lines += [
            "",
            "host ms per routed-experts fwd+bwd: " + ", ".join(f"{k} {v:.3f}" for k, v in result["host_ms"].items()),
        ]
    for label, cells in result["gemm_only"].items():
        lines += ["", f"{label}: " + ", ".join(f"{k} {v:.3g}" for k, v in cells.items())]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
