"""Benchmark the low-precision expert path on one CUDA GPU.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python3 bench/lowprec.py --out bench/results/lowprec.json

- Grouped GEMM TFLOP/s, forward and forward+backward (dX + dW): bf16 `grouped_mm` vs `grouped_mm_fp8`
  (rowwise, blockwise; quantisation included, bf16 in / bf16 out), plus the GEMM alone on pre-quantised
  operands against `torch._scaled_grouped_mm` (rowwise; forward only, if the installed torch has it).
- Expert MLP (up -> SwiGLU -> down over expert-grouped rows) forward+backward: bf16 vs `expert_mlp_fp8`.
- NVFP4 AdamW step per rule vs torch's fused AdamW on fp32 parameters of the same count (ms, GB/s moved,
  parameters/s), and `dequantize_nvfp4` -> bf16 (the per-step cost of NVFP4 storage on Hopper).
Times are `triton.testing.do_bench` medians. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

import nmoe.kernels as nk
from nmoe.kernels import _lowprec_ops as ops
from nmoe.kernels import reference

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    top_k: int
    experts: int
    dim: int
    hidden: int

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k


SHAPES = [Shape("moonlet", 16384, 6, 64, 1024, 704), Shape("speedrun-256", 16384, 8, 256, 1024, 512)]


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def rel_err(a, b) -> float:
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def balanced_offsets(shape: Shape) -> torch.Tensor:
    ids = torch.rand(shape.tokens, shape.experts, device="cuda").topk(shape.top_k, dim=1).indices
    return nk.sort_by_expert(ids, shape.experts).offsets


def scaled_grouped_mm():
    """torch's fp8 grouped GEMM (rowwise scales), or None when the installed torch has none."""
    return getattr(torch, "_scaled_grouped_mm", None)


def fwd_bwd(fn, leaves, dy):
    def run():
        return torch.autograd.grad(fn(), leaves, dy)

    return run


def bench_gemm(label: str, m: int, k: int, n: int, offsets: torch.Tensor, n_experts: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n_experts, k, n, device="cuda", dtype=torch.bfloat16) / k**0.5).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    flop = 2.0 * m * k * n
    row: dict = dict(gemm=label, m=m, k=k, n=n)
    exact = nk.grouped_mm(x, w, offsets)
    cases = {
        "bf16": lambda: nk.grouped_mm(x, w, offsets),
        "fp8_rowwise": lambda: nk.grouped_mm_fp8(x, w, offsets, "rowwise"),
        "fp8_blockwise": lambda: nk.grouped_mm_fp8(x, w, offsets, "blockwise"),
    }
    for name, fn in cases.items():
        row[f"{name}_fwd"] = flop / bench_ms(fn) / 1e9
        row[f"{name}_fwdbwd"] = 3 * flop / bench_ms(fwd_bwd(fn, (x, w), dy)) / 1e9
        if name != "bf16":
            row[f"{name}_err_vs_bf16"] = rel_err(fn(), exact)
    # the GEMM alone on pre-quantised operands (rowwise): ours vs torch._scaled_grouped_mm
    for scaling in ("rowwise", "blockwise"):
        blockwise = scaling == "blockwise"
        qx, sx = ops.quantize_rows(x.detach(), blockwise)
        wop = ops.quantize_weight(w.detach(), blockwise, "fwd")
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        row[f"gemm_only_{scaling}"] = (
            flop / bench_ms(lambda: ops.gemm(qx, sx, blockwise, wop, offsets, out, n, k)) / 1e9
        )
        if not blockwise:
            row["quantise_x_ms"] = bench_ms(lambda: ops.quantize_rows(x.detach(), False))
            row["quantise_w_ms"] = bench_ms(lambda: ops.quantize_weight(w.detach(), False, "fwd"))
            torch_fn = scaled_grouped_mm()
            if torch_fn is None:
                row["torch_error"] = "torch._scaled_grouped_mm not available"
                continue
            w_colmajor = wop.q.transpose(1, 2)  # [E,K,N] view of the [E,N,K] copy: column-major, as torch wants

            def torch_call(fast=False):
                return torch_fn(
                    qx, w_colmajor, sx, wop.scales, offs=offsets, out_dtype=torch.bfloat16, use_fast_accum=fast
                )

            try:
                ours = out.clone()
                ops.gemm(qx, sx, False, wop, offsets, ours, n, k)
                row["torch_scaled_err_vs_ours"] = rel_err(torch_call(), ours)
                row["torch_scaled_grouped_mm"] = flop / bench_ms(torch_call) / 1e9
                # fast accumulation: Hopper's reduced-precision fp8 accumulator, never promoted to fp32
                row["torch_scaled_fast_err_vs_ours"] = rel_err(torch_call(True), ours)
                row["torch_scaled_grouped_mm_fast"] = flop / bench_ms(lambda: torch_call(True)) / 1e9
            except Exception as err:
                row["torch_error"] = repr(err)[:300]
    return row


def bench_expert_mlp(shape: Shape, offsets: torch.Tensor) -> dict:
    m, d, h, e = shape.rows, shape.dim, shape.hidden, shape.experts
    rows = torch.randn(m, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_up = (torch.randn(e, d, 2 * h, device="cuda", dtype=torch.bfloat16) / d**0.5).requires_grad_()
    w_down = (torch.randn(e, h, d, device="cuda", dtype=torch.bfloat16) / h**0.5).requires_grad_()
    dy = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    leaves = (rows, w_up, w_down)
    flop = 3 * 2.0 * m * d * 3 * h

    def bf16():
        return nk.grouped_mm(reference.swiglu(nk.grouped_mm(rows, w_up, offsets)), w_down, offsets)

    row: dict = dict(shape=shape.name, rows=m)
    exact = bf16()
    for name, fn in (
        ("bf16", bf16),
        ("fp8_rowwise", lambda: nk.expert_mlp_fp8(rows, offsets, w_up, w_down, "rowwise")),
        ("fp8_blockwise", lambda: nk.expert_mlp_fp8(rows, offsets, w_up, w_down, "blockwise")),
    ):
        row[f"{name}_fwd_ms"] = bench_ms(fn)
        row[f"{name}_ms"] = bench_ms(fwd_bwd(fn, leaves, dy))
        row[f"{name}_tflops"] = flop / row[f"{name}_ms"] / 1e9
        if name != "bf16":
            row[f"{name}_err_vs_bf16"] = rel_err(fn(), exact)
    return row


# bytes read + written per parameter by one optimizer step
NVFP4_BYTES = 2 * (0.5 + 1 / 16) + 2 + 2 * 4 + 2 * 4  # codes, scales (r+w), bf16 grad, m, v (r+w)
TORCH_BYTES = 3 * 4 * 2 + 4  # fp32 param, m, v (r+w), fp32 grad


def bench_adamw(shape: tuple[int, ...], configs: list[tuple[int, int]]) -> list[dict]:
    """NVFP4 AdamW per rule under each (16-blocks per program, warps) launch config, then the references."""
    numel = 1
    for s in shape:
        numel *= s
    rows = []
    w = torch.randn(shape, device="cuda") * 0.02
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, seed=0)
    default = (ops.NVFP4_ADAMW_BLOCKS, ops.NVFP4_WARPS)
    for blocks, warps in configs:
        ops.NVFP4_ADAMW_BLOCKS, ops.NVFP4_WARPS = blocks, warps
        tag = "" if (blocks, warps) == default else f" [{blocks} blocks, {warps} warps]"
        for rule in ("nearest", "seed", "stochastic", "residual"):
            q = nk.quantize_nvfp4(w)
            m, v = torch.zeros(shape, device="cuda"), torch.zeros(shape, device="cuda")
            residual = torch.zeros(shape, device="cuda", dtype=torch.bfloat16) if rule == "residual" else None
            step = [0]

            def run():
                step[0] += 1
                nk.nvfp4_adamw_(q, grad, m, v, step=step[0], rule=rule, residual=residual, **hyper)

            ms = bench_ms(run)
            nbytes = NVFP4_BYTES + (4 if rule == "residual" else 0)
            rows.append(
                dict(op=f"nvfp4_adamw_ {rule}{tag}", ms=ms, gbps=numel * nbytes / ms / 1e6, gparams=numel / ms / 1e6)
            )
    ops.NVFP4_ADAMW_BLOCKS, ops.NVFP4_WARPS = default
    q = nk.quantize_nvfp4(w)
    ms = bench_ms(lambda: nk.dequantize_nvfp4(q))
    rows.append(
        dict(op="dequantize_nvfp4 -> bf16", ms=ms, gbps=numel * (0.5 + 1 / 16 + 2) / ms / 1e6, gparams=numel / ms / 1e6)
    )
    ms = bench_ms(lambda: nk.quantize_nvfp4(w))
    rows.append(
        dict(op="quantize_nvfp4 (fp32 in)", ms=ms, gbps=numel * (8 + 0.5 + 1 / 16) / ms / 1e6, gparams=numel / ms / 1e6)
    )
    p = torch.nn.Parameter(w.clone())
    p.grad = grad.float()
    opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    ms = bench_ms(opt.step)
    rows.append(
        dict(op="torch AdamW fused (fp32 param)", ms=ms, gbps=numel * TORCH_BYTES / ms / 1e6, gparams=numel / ms / 1e6)
    )
    dst = torch.empty_like(w)
    ms = bench_ms(lambda: dst.copy_(w))
    rows.append(
        dict(op="HBM copy (fp32 copy_, read + write)", ms=ms, gbps=numel * 8 / ms / 1e6, gparams=numel / ms / 1e6)
    )
    copy_gbps = rows[-1]["gbps"]
    for r in rows:
        r["numel"], r["of_copy"] = numel, r["gbps"] / copy_gbps
    return rows


def fmt(value, digits=0) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(result: dict) -> str:
    lines = [
        f"Device: {result['device']}, torch {result['torch']}, triton {result['triton']}, {result['date']}. "
        "Medians of `triton.testing.do_bench`; bf16 in/out; balanced random top-k routing.",
        "",
        "Grouped GEMM TFLOP/s (fwd+bwd = fwd + dX + dW; fp8 columns include the quantisation kernels). "
        "`gemm only` = the fp8 GEMM on pre-quantised operands; torch = `torch._scaled_grouped_mm` (rowwise), "
        "precise and with `use_fast_accum` (Hopper's fp8 accumulator never promoted to fp32; ours promotes).",
        "",
        "| GEMM | M×K×N | bf16 fwd | fp8 row fwd | fp8 block fwd | bf16 f+b | fp8 row f+b | fp8 block f+b | "
        "gemm only row | gemm only block | torch scaled | torch scaled fast | err row / block vs bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["gemm"]:
        if "error" in r:
            lines.append(f"| {r['gemm']} | error: {r['error'][-160:]!r} |")
            continue
        lines.append(
            f"| {r['gemm']} | {r['m']}×{r['k']}×{r['n']} | {fmt(r['bf16_fwd'])} | {fmt(r['fp8_rowwise_fwd'])} | "
            f"{fmt(r['fp8_blockwise_fwd'])} | {fmt(r['bf16_fwdbwd'])} | {fmt(r['fp8_rowwise_fwdbwd'])} | "
            f"{fmt(r['fp8_blockwise_fwdbwd'])} | {fmt(r.get('gemm_only_rowwise'))} | "
            f"{fmt(r.get('gemm_only_blockwise'))} | {fmt(r.get('torch_scaled_grouped_mm'))} | "
            f"{fmt(r.get('torch_scaled_grouped_mm_fast'))} | "
            f"{r['fp8_rowwise_err_vs_bf16']:.3f} / {r['fp8_blockwise_err_vs_bf16']:.3f} |"
        )
    lines += [
        "",
        "Expert MLP over grouped rows (up → SwiGLU → down), fwd+bwd ms (TFLOP/s).",
        "",
        "| shape | rows | bf16 | fp8 rowwise | fp8 blockwise | speed-up row / block | err row / block vs bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["expert_mlp"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | error: {r['error'][-160:]!r} |")
            continue
        lines.append(
            f"| {r['shape']} | {r['rows']} | {r['bf16_ms']:.2f} ({r['bf16_tflops']:.0f}) | "
            f"{r['fp8_rowwise_ms']:.2f} ({r['fp8_rowwise_tflops']:.0f}) | "
            f"{r['fp8_blockwise_ms']:.2f} ({r['fp8_blockwise_tflops']:.0f}) | "
            f"{r['bf16_ms'] / r['fp8_rowwise_ms']:.2f} / {r['bf16_ms'] / r['fp8_blockwise_ms']:.2f} | "
            f"{r['fp8_rowwise_err_vs_bf16']:.3f} / {r['fp8_blockwise_err_vs_bf16']:.3f} |"
        )
    lines += [
        "",
        "Optimizer step on one expert weight tensor; `of copy` = GB/s over the HBM copy measured in this run "
        "(goal for the fused NVFP4 AdamW: >= 80%).",
        "",
        "| op | params | ms | GB/s | of copy | Gparam/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["adamw"]:
        lines.append(
            f"| {r['op']} | {r['numel']:,} | {r['ms']:.3f} | {r['gbps']:.0f} | {r['of_copy']:.0%} | {r['gparams']:.1f} |"
        )
    return "\n".join(lines)


def run(only: list[str] | None, adamw_configs: list[tuple[int, int]]) -> dict:
    props = torch.cuda.get_device_properties(0)
    result = dict(
        device=props.name,
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.date.today().isoformat(),
        shapes=[asdict(s) for s in SHAPES],
        gemm=[],
        expert_mlp=[],
        adamw=[],
    )
    for shape in SHAPES:
        if only is not None and shape.name not in only:
            continue
        torch.manual_seed(0)
        offsets = balanced_offsets(shape)
        for label, k, n in (("up", shape.dim, 2 * shape.hidden), ("down", shape.hidden, shape.dim)):
            try:
                row = bench_gemm(f"{shape.name} {label}", shape.rows, k, n, offsets, shape.experts)
            except Exception:
                row = dict(gemm=f"{shape.name} {label}", error=traceback.format_exc(limit=3)[-600:])
            result["gemm"].append(row)
            print(json.dumps(row), flush=True)
        try:
            row = bench_expert_mlp(shape, offsets)
        except Exception:
            row = dict(shape=shape.name, error=traceback.format_exc(limit=3)[-600:])
        result["expert_mlp"].append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    result["adamw"] = bench_adamw((64, 1024, 1408), adamw_configs)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lowprec.json", help="JSON file")
    parser.add_argument("--only", nargs="*", help="shape names to run (none: the optimizer rows only)")
    parser.add_argument(
        "--adamw-configs",
        default="",
        help="NVFP4 AdamW launch configs to compare, BLOCKSxWARPS,... (default: the library's own)",
    )
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in args.adamw_configs.split(",") if c]
    if not torch.cuda.is_available():
        print("bench/lowprec.py needs a CUDA GPU")
        return 2
    result = run(args.only, configs or [(ops.NVFP4_ADAMW_BLOCKS, ops.NVFP4_WARPS)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
