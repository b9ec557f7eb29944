"""Benchmark nmoe.kernels against PyTorch and torchtitan on MoE expert shapes (one CUDA GPU).

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python3 bench/kernels.py --out DIR
    python3 bench/kernels.py --render bench/results/kernels.json   # table into bench/RESULTS.md

Per shape: our grouped_mm (both variants: "pointer" loads and "tma" descriptors) vs
torch.nn.functional.grouped_mm vs dense cuBLAS at equal FLOPs (forward, and backward = dX + dW, with dX and dW
of ours also timed alone), the whole routed-expert path forward+backward (ours, both variants, vs the same path
composed from PyTorch ops vs torchtitan's RoutedExperts, if importable), expert_mlp over grouped rows (ours vs
composed), and linear_cross_entropy vs the head matmul + F.cross_entropy (time and peak memory). Outputs are
checked against each other in the same run. Times: triton.testing.do_bench medians.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    top_k: int
    experts: int
    dim: int
    hidden: int
    note: str = ""

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k


SHAPES = [
    Shape("moonlet", 16384, 6, 64, 1024, 704, "configs/moonlet.toml"),
    Shape("moonlight-16K", 16384, 6, 64, 2048, 1408),
    Shape("moonlight-64K", 65536, 6, 64, 2048, 1408),
    Shape("speedrun-256", 32768, 8, 256, 1024, 512),
    Shape(
        "dsv3-local",
        2048,
        2,
        8,
        7168,
        2048,
        "8 local of 256 experts; 16K tokens x 8 x 8/256 = 4096 rows, modelled as 2048 tokens top-2 of 8",
    ),
]


CE_SHAPES = [(24576, 1024, 32768, 4096), (24576, 1024, 32768, 8192)]  # moonlet: 12 x 2048 tokens; chunk sizes


def bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def tflops(flop: float, ms: float) -> float:
    return flop / ms / 1e9


def rel_err(a, b) -> float:
    import torch

    if not torch.isfinite(a).all():
        return float("inf")
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def balanced_routing(shape: Shape):
    import torch

    scores = torch.rand(shape.tokens, shape.experts, device="cuda")
    ids = scores.topk(shape.top_k, dim=1).indices
    weights = torch.rand(shape.tokens, shape.top_k, device="cuda")
    return ids, weights


def torch_grouped_mm():
    import torch

    fn = getattr(torch.nn.functional, "grouped_mm", None)
    return fn if fn is not None else torch._grouped_mm


def bench_gemm(label: str, m: int, k: int, n: int, offsets, n_experts: int) -> dict:
    """One grouped GEMM [m,k] x [E,k,n]: ours, torch (row- and column-major weights), dense cuBLAS."""
    import torch

    import nmoe.kernels as nk

    gmm = torch_grouped_mm()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n_experts, k, n, device="cuda", dtype=torch.bfloat16) / k**0.5).requires_grad_()
    w_colmajor = w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    flop = 2.0 * m * k * n
    row: dict = dict(gemm=label, m=m, k=k, n=n)
    ours = nk.grouped_mm(x, w, offsets)
    want = gmm(x, w_colmajor, offs=offsets)
    row["err_vs_torch"] = rel_err(ours, want)
    ours_g = torch.autograd.grad(ours, (x, w), dy)
    want_g = torch.autograd.grad(want, (x, w_colmajor), dy)
    row["err_grad_vs_torch"] = max(rel_err(a, b) for a, b in zip(ours_g, want_g))
    from nmoe.kernels import _triton_ops
    from nmoe.kernels._triton_ops import use_gemm_variant

    def tma(fn):
        def run():
            with use_gemm_variant("tma"):
                return fn()

        return run

    for variant in ("pointer", "tma"):
        tag = "ours" if variant == "pointer" else "ours_tma"
        try:
            with use_gemm_variant(variant):
                row[f"{tag}_err_vs_torch"] = rel_err(nk.grouped_mm(x, w, offsets), want)
                dx_out, dw_out = torch.empty_like(x), torch.empty_like(w)
                row[f"{tag}_dx"] = tflops(
                    flop, bench_ms(lambda: _triton_ops._launch_gmm(dy, w, offsets, dx_out, transpose=True))
                )
                row[f"{tag}_dw"] = tflops(flop, bench_ms(lambda: _triton_ops._launch_dw(x, dy, offsets, dw_out)))
        except Exception as err:  # a variant that fails to build must not hide the other numbers
            row[f"{tag}_error"] = repr(err)[:300]
    cases = {
        "ours": (lambda: nk.grouped_mm(x, w, offsets), (x, w)),
        "ours_tma": (tma(lambda: nk.grouped_mm(x, w, offsets)), (x, w)),
        "torch": (lambda: gmm(x, w, offs=offsets), (x, w)),
        "torch_colmajor_w": (lambda: gmm(x, w_colmajor, offs=offsets), (x, w_colmajor)),
    }
    dense_w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cases["dense"] = (lambda: x @ dense_w, (x, dense_w))
    for name, (fwd, inputs) in cases.items():
        try:
            row[f"{name}_fwd"] = tflops(flop, bench_ms(fwd))
            out = fwd()
            grad = lambda: torch.autograd.grad(out, inputs, dy, retain_graph=True)  # noqa: E731
            if name == "ours_tma":
                grad = tma(grad)
            row[f"{name}_bwd"] = tflops(2 * flop, bench_ms(grad))
        except Exception as err:
            row[f"{name}_error"] = repr(err)[:300]
    return row


def composed_torch_path(x, ids, weights, w_up, w_down):
    """The routed-expert path from PyTorch ops: argsort, gather, grouped_mm, SwiGLU, grouped_mm, index_add."""
    import torch
    import torch.nn.functional as F

    gmm = torch_grouped_mm()
    n_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w_up.shape[0], dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )
    offsets = counts.cumsum(0, dtype=torch.int32)
    token = order // top_k
    gate_up = gmm(x[token], w_up, offs=offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    out = gmm(F.silu(gate) * up, w_down, offs=offsets)
    out = out * weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add(0, token, out)


def make_torchtitan(shape: Shape, w_up, w_down):
    import torch
    from torchtitan.models.common.moe import GroupedExperts, RoutedExperts
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    cfg = RoutedExperts.Config(
        inner_experts=GroupedExperts.Config(dim=shape.dim, hidden_dim=shape.hidden, num_experts=shape.experts),
        token_dispatcher=LocalTokenDispatcher.Config(num_experts=shape.experts, top_k=shape.top_k),
    )
    layer = cfg.build().cuda()
    h = shape.hidden
    with torch.no_grad():
        experts = layer.inner_experts
        experts.w1_EFD = torch.nn.Parameter(w_up[..., :h].transpose(1, 2).contiguous())
        experts.w3_EFD = torch.nn.Parameter(w_up[..., h:].transpose(1, 2).contiguous())
        experts.w2_EDF = torch.nn.Parameter(w_down.transpose(1, 2).contiguous())
    return layer


def bench_expert_path(shape: Shape, torchtitan_error: str | None) -> dict:
    import torch

    import nmoe.kernels as nk

    ids, weights = balanced_routing(shape)
    x = torch.randn(shape.tokens, shape.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_up = (
        torch.randn(shape.experts, shape.dim, 2 * shape.hidden, device="cuda", dtype=torch.bfloat16) / shape.dim**0.5
    ).requires_grad_()
    w_down = (
        torch.randn(shape.experts, shape.hidden, shape.dim, device="cuda", dtype=torch.bfloat16) / shape.hidden**0.5
    ).requires_grad_()
    weights.requires_grad_()
    dy = torch.randn(shape.tokens, shape.dim, device="cuda", dtype=torch.bfloat16)
    inputs = (x, weights, w_up, w_down)
    # torch's grouped_mm gets column-major expert weights (same values), the layout torchtitan uses
    up_cm, down_cm = (w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for w in (w_up, w_down))
    composed_inputs = (x, weights, up_cm, down_cm)
    flop = 3 * 2.0 * shape.rows * shape.dim * 3 * shape.hidden  # fwd + bwd of both projections
    row: dict = dict(shape=shape.name, rows=shape.rows)

    def step(fn, leaves):
        def run():
            y = fn()
            return torch.autograd.grad(y, leaves, dy)

        return run

    ours = lambda: nk.moe_experts(x, ids, weights, w_up, w_down)  # noqa: E731
    composed = lambda: composed_torch_path(x, ids, weights, up_cm, down_cm)  # noqa: E731
    y_ours, y_ref = ours(), composed()
    row["err_vs_composed"] = rel_err(y_ours, y_ref)
    g_ours = torch.autograd.grad(y_ours, inputs, dy)
    g_ref = torch.autograd.grad(y_ref, composed_inputs, dy)
    row["err_grads_vs_composed"] = max(rel_err(a, b) for a, b in zip(g_ours, g_ref))
    from nmoe.kernels._triton_ops import use_gemm_variant

    def ours_tma():
        with use_gemm_variant("tma"):
            return nk.moe_experts(x, ids, weights, w_up, w_down)

    def step_tma():
        with use_gemm_variant("tma"):
            return step(ours, inputs)()

    for name, fn, leaves in (("ours", ours, inputs), ("composed", composed, composed_inputs)):
        row[f"{name}_fwd_ms"] = bench_ms(fn)
        row[f"{name}_ms"] = bench_ms(step(fn, leaves))
    try:
        row["err_tma_vs_composed"] = rel_err(ours_tma(), y_ref)
        row["ours_tma_fwd_ms"] = bench_ms(ours_tma)
        row["ours_tma_ms"] = bench_ms(step_tma)
    except Exception as err:
        row["ours_tma_error"] = repr(err)[:300]
    if torchtitan_error is None:
        try:
            layer = make_torchtitan(shape, w_up.detach(), w_down.detach())
            counts = torch.zeros(shape.experts, dtype=torch.int64, device="cuda").scatter_add_(
                0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.int64, device="cuda")
            )
            x3 = x.view(1, shape.tokens, shape.dim)
            titan = lambda: layer(x3, weights.view(1, *ids.shape), ids.view(1, *ids.shape), counts).view_as(x)  # noqa
            leaves = (x, weights, *layer.inner_experts.parameters())
            row["err_torchtitan_vs_composed"] = rel_err(titan(), y_ref)
            row["torchtitan_fwd_ms"] = bench_ms(titan)
            row["torchtitan_ms"] = bench_ms(step(titan, leaves))
        except Exception as err:
            row["torchtitan_error"] = repr(err)[:300]
    else:
        row["torchtitan_error"] = torchtitan_error
    row["ours_tflops"] = tflops(flop, row["ours_ms"])
    row["speedup_vs_composed"] = row["composed_ms"] / row["ours_ms"]
    if "torchtitan_ms" in row:
        row["speedup_vs_torchtitan"] = row["torchtitan_ms"] / row["ours_ms"]
    return row


def bench_expert_mlp(shape: Shape) -> dict:
    """expert_mlp over rows already grouped by expert (the expert-parallel owner's work), fwd+bwd, vs composed."""
    import torch
    import torch.nn.functional as F

    import nmoe.kernels as nk
    from nmoe.kernels._triton_ops import use_gemm_variant

    gmm = torch_grouped_mm()
    offsets = gemm_offsets(shape)
    rows = torch.randn(shape.rows, shape.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_up = torch.randn(shape.experts, shape.dim, 2 * shape.hidden, device="cuda", dtype=torch.bfloat16) / 32
    w_down = torch.randn(shape.experts, shape.hidden, shape.dim, device="cuda", dtype=torch.bfloat16) / 32
    w_up.requires_grad_()
    w_down.requires_grad_()
    up_cm, down_cm = (w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for w in (w_up, w_down))
    dy = torch.randn(shape.rows, shape.dim, device="cuda", dtype=torch.bfloat16)

    def composed():
        gate, up = gmm(rows, up_cm, offs=offsets).chunk(2, dim=-1)
        return gmm(F.silu(gate) * up, down_cm, offs=offsets)

    def ours(variant):
        def run():
            with use_gemm_variant(variant):
                y = nk.expert_mlp(rows, offsets, w_up, w_down)
                return y, torch.autograd.grad(y, (rows, w_up, w_down), dy)

        return run

    def composed_step():
        y = composed()
        return torch.autograd.grad(y, (rows, up_cm, down_cm), dy)

    flop = 3 * 2.0 * shape.rows * shape.dim * 3 * shape.hidden
    row: dict = dict(shape=shape.name, rows=shape.rows)
    row["err_vs_composed"] = rel_err(ours("pointer")()[0], composed())
    row["ours_ms"] = bench_ms(ours("pointer"))
    row["composed_ms"] = bench_ms(composed_step)
    try:
        row["err_tma_vs_composed"] = rel_err(ours("tma")()[0], composed())
        row["ours_tma_ms"] = bench_ms(ours("tma"))
    except Exception as err:
        row["ours_tma_error"] = repr(err)[:300]
    best = min(row["ours_ms"], row.get("ours_tma_ms", float("inf")))
    row["ours_tflops"] = tflops(flop, best)
    row["speedup_vs_composed"] = row["composed_ms"] / best
    return row


def bench_linear_cross_entropy(n: int, dim: int, vocab: int, chunk: int) -> dict:
    """linear_cross_entropy vs head matmul + F.cross_entropy(logits.float()) (the trainer's loss), fwd+bwd."""
    import torch
    import torch.nn.functional as F

    import nmoe.kernels as nk

    h = (torch.randn(n, dim, device="cuda") / dim**0.25).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, dim, device="cuda") / dim**0.5).requires_grad_()  # fp32 master, as in training
    targets = torch.randint(0, vocab, (n,), device="cuda")

    def baseline():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = F.linear(h, weight)
        loss = F.cross_entropy(logits.float(), targets)
        return loss, torch.autograd.grad(loss, (h, weight))

    def fused():
        loss = nk.linear_cross_entropy(h, weight, targets, chunk_size=chunk)
        return loss, torch.autograd.grad(loss, (h, weight))

    row: dict = dict(n=n, dim=dim, vocab=vocab, chunk=chunk)
    (l_base, g_base), (l_ours, g_ours) = baseline(), fused()
    row["loss_diff"] = abs(l_base.item() - l_ours.item())
    row["err_grads"] = max(rel_err(a, b) for a, b in zip(g_ours, g_base))
    for name, fn in (("baseline", baseline), ("ours", fused)):
        row[f"{name}_ms"] = bench_ms(fn)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        row[f"{name}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - start
    row["speedup"] = row["baseline_ms"] / row["ours_ms"]
    row["peak_saved_bytes"] = row["baseline_peak_extra_bytes"] - row["ours_peak_extra_bytes"]
    return row


def gemm_offsets(shape: Shape):

    from nmoe.kernels import sort_by_expert

    ids, _ = balanced_routing(shape)
    return sort_by_expert(ids, shape.experts).offsets


def run(out_dir: Path, only: list[str] | None) -> dict:
    import torch
    import triton

    try:
        import torchtitan  # noqa: F401

        torchtitan_error = None
    except Exception as err:
        torchtitan_error = f"torchtitan not importable: {err!r}"[:300]
    props = torch.cuda.get_device_properties(0)
    result = dict(
        device=props.name,
        sms=props.multi_processor_count,
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.date.today().isoformat(),
        torchtitan=None if torchtitan_error else importlib.metadata.version("torchtitan"),
        torchtitan_error=torchtitan_error,
        gemm=[],
        expert_path=[],
        expert_mlp=[],
        linear_cross_entropy=[],
        shapes=[asdict(s) for s in SHAPES],
    )
    for shape in SHAPES:
        if only and shape.name not in only:
            continue
        torch.manual_seed(0)
        offsets = gemm_offsets(shape)
        for label, k, n in (("up", shape.dim, 2 * shape.hidden), ("down", shape.hidden, shape.dim)):
            try:
                row = bench_gemm(f"{shape.name} {label}", shape.rows, k, n, offsets, shape.experts)
            except Exception as err:
                row = dict(gemm=f"{shape.name} {label}", error=traceback.format_exc(limit=3)[-600:])
                print(err, file=sys.stderr)
            result["gemm"].append(row)
            print(json.dumps(row), flush=True)
        try:
            row = bench_expert_path(shape, torchtitan_error)
        except Exception as err:
            row = dict(shape=shape.name, error=traceback.format_exc(limit=3)[-600:])
            print(err, file=sys.stderr)
        result["expert_path"].append(row)
        print(json.dumps(row), flush=True)
        try:
            row = bench_expert_mlp(shape)
        except Exception as err:
            row = dict(shape=shape.name, error=traceback.format_exc(limit=3)[-600:])
            print(err, file=sys.stderr)
        result["expert_mlp"].append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    for n, dim, vocab, chunk in CE_SHAPES:
        try:
            row = bench_linear_cross_entropy(n, dim, vocab, chunk)
        except Exception as err:
            row = dict(n=n, dim=dim, vocab=vocab, chunk=chunk, error=traceback.format_exc(limit=3)[-600:])
            print(err, file=sys.stderr)
        result["linear_cross_entropy"].append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    json_path = out_json(out_dir)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    return result


def out_json(out: Path) -> Path:
    """--out X.json names the results file; --out DIR means DIR/kernels.json."""
    return out if out.suffix == ".json" else out / "kernels.json"


def fmt(value, digits=0) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(result: dict) -> str:
    lines = [
        f"Device: {result['device']} ({result['sms']} SMs), torch {result['torch']}, triton {result['triton']}, "
        f"{result['date']}. Medians of `triton.testing.do_bench`; bf16; balanced random top-k routing.",
        "",
    ]
    lines += [
        "Grouped GEMM, TFLOP/s (bwd = dX + dW). torch = `F.grouped_mm`, best of row-/column-major weights; "
        "dense = cuBLAS `x @ W` at equal FLOPs.",
        "",
        "| GEMM | M×K×N | ours fwd | tma fwd | torch fwd | dense fwd | ours bwd | tma bwd | torch bwd | dense bwd | "
        "ours dX / dW | tma dX / dW | best/torch fwd | best/torch bwd | err vs torch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["gemm"]:
        if "error" in r:
            lines.append(f"| {r['gemm']} | error: {r['error'][-120:]!r} |")
            continue
        tf = max(r.get("torch_fwd", 0), r.get("torch_colmajor_w_fwd", 0)) or None
        tb = max(r.get("torch_bwd", 0), r.get("torch_colmajor_w_bwd", 0)) or None
        best_f = max(r.get("ours_fwd", 0), r.get("ours_tma_fwd", 0))
        best_b = max(r.get("ours_bwd", 0), r.get("ours_tma_bwd", 0))
        lines.append(
            f"| {r['gemm']} | {r['m']}×{r['k']}×{r['n']} | {fmt(r.get('ours_fwd'))} | {fmt(r.get('ours_tma_fwd'))} | "
            f"{fmt(tf)} | {fmt(r.get('dense_fwd'))} | {fmt(r.get('ours_bwd'))} | {fmt(r.get('ours_tma_bwd'))} | "
            f"{fmt(tb)} | {fmt(r.get('dense_bwd'))} | {fmt(r.get('ours_dx'))} / {fmt(r.get('ours_dw'))} | "
            f"{fmt(r.get('ours_tma_dx'))} / {fmt(r.get('ours_tma_dw'))} | "
            f"{fmt(best_f / tf if tf else None, 2)} | {fmt(best_b / tb if tb else None, 2)} | "
            f"{r['err_vs_torch']:.1e} (tma {r.get('ours_tma_err_vs_torch', float('nan')):.1e}) / "
            f"{r['err_grad_vs_torch']:.1e} |"
        )
    lines += [
        "",
        "Routed-expert path (sort → gather → up → SwiGLU → down → weighted combine), forward+backward, ms.",
        f"torchtitan: {result['torchtitan'] or result['torchtitan_error']}",
        "",
        "| shape | rows | ours | ours tma | composed PyTorch | torchtitan | ours TFLOP/s | × vs composed | "
        "× vs torchtitan | ours fwd | tma fwd | composed fwd | err y / grads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["expert_path"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | error: {r['error'][-120:]!r} |")
            continue
        lines.append(
            f"| {r['shape']} | {r['rows']} | {fmt(r['ours_ms'], 2)} | {fmt(r.get('ours_tma_ms'), 2)} | "
            f"{fmt(r['composed_ms'], 2)} | "
            f"{fmt(r.get('torchtitan_ms'), 2)} | {fmt(r['ours_tflops'])} | {fmt(r['speedup_vs_composed'], 2)} | "
            f"{fmt(r.get('speedup_vs_torchtitan'), 2)} | {fmt(r['ours_fwd_ms'], 2)} | "
            f"{fmt(r.get('ours_tma_fwd_ms'), 2)} | {fmt(r['composed_fwd_ms'], 2)} | "
            f"{r['err_vs_composed']:.1e} / {r['err_grads_vs_composed']:.1e} |"
        )
    lines += [
        "",
        "expert_mlp over rows grouped by expert (the expert-parallel owner's work), forward+backward, ms.",
        "",
        "| shape | rows | ours | ours tma | composed (F.grouped_mm) | best TFLOP/s | × vs composed | err (tma) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.get("expert_mlp", []):
        if "error" in r:
            lines.append(f"| {r['shape']} | error: {r['error'][-120:]!r} |")
            continue
        lines.append(
            f"| {r['shape']} | {r['rows']} | {fmt(r['ours_ms'], 2)} | {fmt(r.get('ours_tma_ms'), 2)} | "
            f"{fmt(r['composed_ms'], 2)} | {fmt(r['ours_tflops'])} | {fmt(r['speedup_vs_composed'], 2)} | "
            f"{r['err_vs_composed']:.1e} ({r.get('err_tma_vs_composed', float('nan')):.1e}) |"
        )
    lines += [
        "",
        "linear_cross_entropy (bf16 h, fp32 master weight) vs autocast head matmul + F.cross_entropy(logits.float()), "
        "forward+backward; peak = bytes allocated above the inputs.",
        "",
        "| N×D×V | chunk | ours ms | baseline ms | × | ours peak GiB | baseline peak GiB | saved GiB | loss diff | "
        "err grads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.get("linear_cross_entropy", []):
        shape = f"{r['n']}×{r['dim']}×{r['vocab']} | {r.get('chunk')}"
        if "error" in r:
            lines.append(f"| {shape} | error: {r['error'][-120:]!r} |")
            continue
        gib = 2.0**30
        lines.append(
            f"| {shape} | {fmt(r['ours_ms'], 2)} | {fmt(r['baseline_ms'], 2)} | {fmt(r['speedup'], 2)} | "
            f"{fmt(r['ours_peak_extra_bytes'] / gib, 2)} | {fmt(r['baseline_peak_extra_bytes'] / gib, 2)} | "
            f"{fmt(r['peak_saved_bytes'] / gib, 2)} | {r['loss_diff']:.1e} | {r['err_grads']:.1e} |"
        )
    return "\n".join(lines)


def write_results_section(table: str, notes: str) -> None:
    """Replace (or append) the `## Kernels` section of bench/RESULTS.md, leaving other sections alone."""
    path = REPO / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"## Kernels\n\n{table}\n\n{notes.strip()}\n" if notes.strip() else f"## Kernels\n\n{table}\n"
    start = text.find("## Kernels\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end:])
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results file X.json or folder")
    parser.add_argument("--only", nargs="*", help="shape names to run (default: all but moonlight-64K; see --all)")
    parser.add_argument("--all", action="store_true", help="also run moonlight-64K (several more minutes)")
    parser.add_argument("--render", type=Path, help="kernels.json to render into bench/RESULTS.md (no GPU needed)")
    parser.add_argument("--notes", type=Path, help="markdown file appended below the tables with --render")
    args = parser.parse_args()
    if args.render:
        notes = args.notes.read_text() if args.notes else ""
        write_results_section(render(json.loads(args.render.read_text())), notes)
        return 0
    only = args.only or (None if args.all else [s.name for s in SHAPES if s.name != "moonlight-64K"])
    result = run(args.out, only)
    table = render(result)
    out_json(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
