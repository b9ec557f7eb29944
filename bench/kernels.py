"""Benchmark nmoe.kernels against PyTorch and torchtitan on MoE expert shapes (one CUDA GPU).

    PYTHONPATH=packages/nmoe-kernels/src python3 bench/kernels.py --out DIR
    python3 bench/kernels.py --render bench/results/kernels.json   # table into bench/RESULTS.md

Per shape: our grouped_mm vs torch.nn.functional.grouped_mm vs dense cuBLAS at equal FLOPs (forward, and
backward = dX + dW), and the whole routed-expert path forward+backward (ours vs the same path composed from
PyTorch ops vs torchtitan's RoutedExperts, if importable). Outputs are checked against each other in the same run.
Times: triton.testing.do_bench medians.
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


def bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


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
    cases = {
        "ours": (lambda: nk.grouped_mm(x, w, offsets), (x, w)),
        "torch": (lambda: gmm(x, w, offs=offsets), (x, w)),
        "torch_colmajor_w": (lambda: gmm(x, w_colmajor, offs=offsets), (x, w_colmajor)),
    }
    dense_w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cases["dense"] = (lambda: x @ dense_w, (x, dense_w))
    for name, (fwd, inputs) in cases.items():
        try:
            row[f"{name}_fwd"] = tflops(flop, bench_ms(fwd))
            out = fwd()
            row[f"{name}_bwd"] = tflops(
                2 * flop, bench_ms(lambda: torch.autograd.grad(out, inputs, dy, retain_graph=True))
            )
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
    for name, fn, leaves in (("ours", ours, inputs), ("composed", composed, composed_inputs)):
        row[f"{name}_fwd_ms"] = bench_ms(fn)
        row[f"{name}_ms"] = bench_ms(step(fn, leaves))
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
        torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.json").write_text(json.dumps(result, indent=1))
    return result


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
        "| GEMM | M×K×N | ours fwd | torch fwd | dense fwd | ours bwd | torch bwd | dense bwd | ours/torch fwd | "
        "ours/dense fwd | err vs torch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["gemm"]:
        if "error" in r:
            lines.append(f"| {r['gemm']} | error: {r['error'][-120:]!r} |")
            continue
        tf = max(r.get("torch_fwd", 0), r.get("torch_colmajor_w_fwd", 0)) or None
        tb = max(r.get("torch_bwd", 0), r.get("torch_colmajor_w_bwd", 0)) or None
        lines.append(
            f"| {r['gemm']} | {r['m']}×{r['k']}×{r['n']} | {fmt(r.get('ours_fwd'))} | {fmt(tf)} | "
            f"{fmt(r.get('dense_fwd'))} | {fmt(r.get('ours_bwd'))} | {fmt(tb)} | {fmt(r.get('dense_bwd'))} | "
            f"{fmt(r.get('ours_fwd', 0) / tf if tf else None, 2)} | "
            f"{fmt(r.get('ours_fwd', 0) / r['dense_fwd'] if r.get('dense_fwd') else None, 2)} | "
            f"{r['err_vs_torch']:.1e} / {r['err_grad_vs_torch']:.1e} |"
        )
    lines += [
        "",
        "Routed-expert path (sort → gather → up → SwiGLU → down → weighted combine), forward+backward, ms.",
        f"torchtitan: {result['torchtitan'] or result['torchtitan_error']}",
        "",
        "| shape | rows | ours | composed PyTorch | torchtitan | ours TFLOP/s | × vs composed | × vs torchtitan | "
        "ours fwd | composed fwd | err y / grads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["expert_path"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | error: {r['error'][-120:]!r} |")
            continue
        lines.append(
            f"| {r['shape']} | {r['rows']} | {fmt(r['ours_ms'], 2)} | {fmt(r['composed_ms'], 2)} | "
            f"{fmt(r.get('torchtitan_ms'), 2)} | {fmt(r['ours_tflops'])} | {fmt(r['speedup_vs_composed'], 2)} | "
            f"{fmt(r.get('speedup_vs_torchtitan'), 2)} | {fmt(r['ours_fwd_ms'], 2)} | {fmt(r['composed_fwd_ms'], 2)} | "
            f"{r['err_vs_composed']:.1e} / {r['err_grads_vs_composed']:.1e} |"
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
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--only", nargs="*", help="shape names to run")
    parser.add_argument("--render", type=Path, help="kernels.json to render into bench/RESULTS.md (no GPU needed)")
    parser.add_argument("--notes", type=Path, help="markdown file appended below the tables with --render")
    args = parser.parse_args()
    if args.render:
        notes = args.notes.read_text() if args.notes else ""
        write_results_section(render(json.loads(args.render.read_text())), notes)
        return 0
    result = run(args.out, args.only)
    table = render(result)
    (args.out / "kernels.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
