"""GPU check of the low-precision kernels at real shapes (run by hand on a CUDA machine; not collected by pytest).

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python3 packages/nmoe-kernels/tests/gpu_lowprec.py [--out DIR]

Quantisers and the NVFP4 AdamW must equal reference_lowprec bit for bit (run on the same GPU); fp8 GEMMs are
compared with float64 of the same quantised math (and, for information, with the exact bf16 math). Outputs
are poisoned first (0xFF bytes: NaN in bf16/fp32/e4m3) so unwritten elements show.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import RESULTS, offsets_for, poison_allocator, record, rel_err  # noqa: E402

import nmoe.kernels as nk  # noqa: E402
from nmoe.kernels import reference  # noqa: E402
from nmoe.kernels import reference_lowprec as R

_INT_VIEW = {torch.float8_e4m3fn: torch.uint8, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def mismatches(got: torch.Tensor, want: torch.Tensor) -> int:
    """Number of elements whose bits differ (-1 for a shape/dtype mismatch)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return -1
    view = _INT_VIEW.get(got.dtype)
    a, b = (got.view(view), want.view(view)) if view else (got, want)
    return int((a != b).sum())


def grouped_offsets(rows: int, n_experts: int, layout: str) -> tuple[torch.Tensor, int]:
    """Expert offsets for `rows` routed rows -> (offsets, total rows incl. a tail past offsets[-1])."""
    if layout == "balanced":
        sizes = [rows // n_experts] * n_experts
        return offsets_for(sizes), rows
    if layout == "one_huge":
        sizes = [0] * n_experts
        sizes[n_experts // 2] = rows
        return offsets_for(sizes), rows
    g = torch.Generator().manual_seed(0)  # skewed, half the experts empty, 77 tail rows
    weights = torch.rand(n_experts, generator=g) ** 3 * (torch.arange(n_experts) % 2 == 0)
    sizes = (weights / weights.sum() * rows).long().tolist()
    return offsets_for(sizes), sum(sizes) + 77


def check_quantisers(m: int, d: int, h: int, n_experts: int) -> None:
    x = (torch.randn(m, d, device="cuda") * torch.logspace(-3, 2, m, device="cuda")[:, None]).bfloat16()
    w = torch.randn(n_experts, d, 2 * h, device="cuda") * 0.02
    w[1, 7, :], w[2, :, 5] = 0, 0  # dead slices along both axes: the zero-slice scale
    poison_allocator(2 * x.numel() * 4)
    cases = {
        "fp8 rowwise x": (nk.quantize_fp8_rowwise(x), R.quantize_fp8_rowwise(x)),
        "fp8 blockwise x": (nk.quantize_fp8_blockwise(x), R.quantize_fp8_blockwise(x, (1, 128))),
        "fp8 rowwise w dim1": (nk.quantize_fp8_rowwise(w, 1), R.quantize_fp8_rowwise(w, 1)),
        "fp8 blockwise w": (nk.quantize_fp8_blockwise(w), R.quantize_fp8_blockwise(w, (128, 128))),
        "nvfp4 w": (nk.quantize_nvfp4(w), R.quantize_nvfp4(w)),
    }
    for name, (got, want) in cases.items():
        bad = {f"mismatch_{i}": mismatches(a, b) for i, (a, b) in enumerate(zip(got, want))}
        record(f"quantiser {name} {tuple(got[0].shape)}", all(v == 0 for v in bad.values()), **bad)
    from nmoe.kernels import _lowprec_ops

    w_down = torch.randn(n_experts, h, d, device="cuda") * 0.02
    w_down[3, 11, :], w_down[4, :, 9] = 0, 0
    weights = (
        ("w_up", w, "dgrad", "fwd"),  # rowwise: its slab pass writes both layouts (the tile is not used)
        ("w_up with K 704", w[:, :704].contiguous(), "dgrad", "fwd"),  # rowwise: the transposed copy
        ("w_down", w_down, "fwd", "dgrad"),
    )
    for name, weight, fold_pass, scale_pass in weights:
        for blockwise in (False, True):
            q_ref, s_ref = R.quantize_weight(weight, "blockwise" if blockwise else "rowwise", scale_pass)
            label = "blockwise" if blockwise else f"rowwise, folded into {fold_pass}"
            shipped = _lowprec_ops.TRANSPOSE_BLOCK
            for block in sorted({32, 64, 128, shipped}):  # every transpose tile the profile sweeps
                _lowprec_ops.TRANSPOSE_BLOCK = block
                try:
                    poison_allocator(2 * weight.numel())
                    q, qt, s = _lowprec_ops.quantize_weight_both(weight, blockwise, fold_pass)
                finally:
                    _lowprec_ops.TRANSPOSE_BLOCK = shipped
                bad = dict(q=mismatches(q, q_ref), qt=mismatches(qt, q_ref.transpose(1, 2).contiguous()))
                bad["scales"] = mismatches(s, s_ref)
                tag = " (shipped)" if block == shipped else ""
                record(
                    f"one quantisation, both layouts: {name} {label}, transpose tile {block}{tag}",
                    all(v == 0 for v in bad.values()),
                    **bad,
                )
    q = nk.quantize_nvfp4(w)
    for dtype in (torch.bfloat16, torch.float32):
        poison_allocator(w.numel() * 4 * 2)
        bad = mismatches(nk.dequantize_nvfp4(q, dtype), R.dequantize_nvfp4(q, dtype))
        record(
            f"dequantize_nvfp4 -> {dtype}",
            bad == 0,
            mismatches=bad,
            rel_err=rel_err(R.dequantize_nvfp4(q, torch.float32), w),
        )


def check_grouped_mm_fp8(name: str, m_rows: int, k: int, n: int, n_experts: int, layout: str, scaling: str) -> None:
    offsets, m = grouped_offsets(m_rows, n_experts, layout)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(n_experts, k, n, device="cuda") / k**0.5).requires_grad_()  # fp32 master weights
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    poison_allocator(m * (k + n) * 8)
    y = nk.grouped_mm_fp8(x, w, offsets, scaling)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    want = R.grouped_mm_fp8(*leaves, offsets, scaling, compute=torch.float64)
    want_dx, want_dw = torch.autograd.grad(want, leaves, dy)
    used = int(offsets[-1])
    exact = reference.grouped_mm(x.detach().float(), w.detach(), offsets)
    errs = dict(y=rel_err(y, want), dx=rel_err(dx, want_dx), dw=rel_err(dw, want_dw))
    tail_ok = bool(y[used:].eq(0).all() and dx[used:].eq(0).all())
    record(
        f"grouped_mm_fp8 {scaling} {name}",
        max(errs.values()) < 1e-2 and tail_ok and y.dtype == torch.bfloat16 and dw.dtype == torch.float32,
        m=m,
        k=k,
        n=n,
        layout=layout,
        **errs,
        tail_zero=tail_ok,
        err_vs_exact_bf16_math=rel_err(y, exact),
    )


def check_expert_mlp_fp8(
    name: str, m_rows: int, d: int, h: int, n_experts: int, layout: str, scaling: str, **recipe
) -> None:
    """recipe: expert_mlp_fp8's wgrad_fp8 / fast_accum (fast accumulation is not modelled by the reference: the
    same tolerance must hold)."""
    offsets, m = grouped_offsets(m_rows, n_experts, layout)
    rows = torch.randn(m, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w_up = (torch.randn(n_experts, d, 2 * h, device="cuda") / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, device="cuda") / h**0.5).requires_grad_()
    dy = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    poison_allocator(m * (d + 3 * h) * 8)
    y = nk.expert_mlp_fp8(rows, offsets, w_up, w_down, scaling, **recipe)
    grads = torch.autograd.grad(y, (rows, w_up, w_down), dy)
    leaves = [t.detach().clone().requires_grad_() for t in (rows, w_up, w_down)]
    wgrad_fp8 = recipe.get("wgrad_fp8", True)
    want = R.expert_mlp_fp8(leaves[0], offsets, leaves[1], leaves[2], scaling, torch.float64, wgrad_fp8=wgrad_fp8)
    want_grads = torch.autograd.grad(want, leaves, dy)
    errs = dict(y=rel_err(y, want))
    errs.update({f"d_{n}": rel_err(g, r) for n, g, r in zip(("rows", "w_up", "w_down"), grads, want_grads)})
    ex = [t.detach().float().requires_grad_() for t in (rows, w_up, w_down)]
    exact = reference.grouped_mm(reference.swiglu(reference.grouped_mm(ex[0], ex[1], offsets)), ex[2], offsets)
    label = "".join(f" {k}={v}" for k, v in recipe.items())
    record(
        f"expert_mlp_fp8 {scaling}{label} {name}",
        max(errs.values()) < 2e-2,
        m=m,
        d=d,
        h=h,
        experts=n_experts,
        layout=layout,
        **errs,
        err_vs_exact_math=rel_err(y, exact),
    )


def check_moe_experts_fp8(
    name: str, tokens: int, top_k: int, d: int, h: int, n_experts: int, scaling: str, dead: str = "", **recipe
):
    """The fused op (token-order quantisation, gathering GEMMs, weighted combine and SwiGLU backward) against its
    float64 reference: skewed routing with every other expert empty and 5% of the slots dropped. dead: 'slices'
    zeroes a row of w_down and a column of w_up (their gradients are checked alone), 'zero_init' all of w_down."""
    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.rand(n_experts, device="cuda", generator=g) ** 3 * (torch.arange(n_experts, device="cuda") % 2 == 0)
    ids = torch.multinomial(p.expand(tokens, -1), top_k, generator=g)
    ids[torch.rand(tokens, top_k, device="cuda", generator=g) < 0.05] = -1
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weights = torch.rand(tokens, top_k, device="cuda").requires_grad_()
    w_up = (torch.randn(n_experts, d, 2 * h, device="cuda") / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, device="cuda") / h**0.5).requires_grad_()
    with torch.no_grad():
        if dead == "slices":
            w_down[2, 11], w_up[4, :, 9] = 0, 0
        if dead == "zero_init":
            w_down.zero_()
    leaves = (x, weights, w_up, w_down)
    dy = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    poison_allocator(tokens * top_k * (d + 3 * h) * 8)
    y = nk.moe_experts_fp8(x, ids, weights, w_up, w_down, scaling, **recipe)
    grads = torch.autograd.grad(y, leaves, dy)
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    wgrad_fp8 = recipe.get("wgrad_fp8", True)
    want = R.moe_experts_fp8(ref[0], ids, *ref[1:], scaling, torch.float64, wgrad_fp8=wgrad_fp8)
    want_grads = torch.autograd.grad(want, ref, dy)
    errs = dict(y=rel_err(y, want))
    errs.update({f"d_{n}": rel_err(a, b) for n, a, b in zip(("x", "weights", "w_up", "w_down"), grads, want_grads)})
    dropped_zero = bool(grads[1][ids < 0].eq(0).all())
    if dead == "slices":
        errs["d_w_down dead row"] = rel_err(grads[3][2, 11], want_grads[3][2, 11])
        errs["d_w_up dead column"] = rel_err(grads[2][4, :, 9], want_grads[2][4, :, 9])
    label = "".join(f" {k}={v}" for k, v in recipe.items()) + (f" dead={dead}" if dead else "")
    record(f"moe_experts_fp8 {scaling}{label} {name}", max(errs.values()) < 2e-2 and dropped_zero, **errs,
           dropped_weight_grads_zero=dropped_zero)  # fmt: skip


def check_cutlass_gemm(name: str, m_rows: int, k: int, n: int, n_experts: int, layout: str) -> None:
    """The plain grouped GEMM through torch's CUTLASS kernel and through ours: the same bits on every routed row
    (rows past offsets[-1] are undefined), with unit (folded) and real column scales."""
    from nmoe.kernels import _lowprec_ops as ops

    offsets, m = grouped_offsets(m_rows, n_experts, layout)
    qa, sa = ops.quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), False)
    w = torch.randn(n_experts, k, n, device="cuda") / k**0.5
    used = int(offsets[-1])
    for scales in ("real", "folded"):
        b = ops.quantize_weight(w, False, "fwd")
        if scales == "folded":
            b = ops.WeightOperand(b.q, ops._unit_scale(b.q.device), b.strides, (0, 0, 0))
        poison_allocator(m * n * 4)
        with ops.use_fp8_gemm_kernel("cutlass"):
            theirs = ops.gemm_rows(qa, sa, b, offsets, n, k, torch.bfloat16, True)
        with ops.use_fp8_gemm_kernel("triton"):
            ours = ops.gemm_rows(qa, sa, b, offsets, n, k, torch.bfloat16, True)
        bad = mismatches(theirs[:used], ours[:used])
        record(f"cutlass gemm = ours bitwise, {scales} scales, {name}", bad == 0, mismatches=bad, m=m, k=k, n=n)


def check_quack_gemm(name: str, tokens: int, top_k: int, k: int, n: int, n_experts: int, call_site: str) -> None:
    """A gathering grouped GEMM (rows read through the routing, 5% of the slots dropped) through quack's kernel and
    through ours: the same bits on every routed row, with real and unit (folded) column scales."""
    from nmoe.kernels import _lowprec_ops as ops
    from nmoe.kernels import _triton_ops

    g = torch.Generator(device="cuda").manual_seed(3)
    ids = torch.rand(tokens, n_experts, device="cuda", generator=g).topk(top_k, dim=1).indices
    ids[torch.rand(tokens, top_k, device="cuda", generator=g) < 0.05] = -1
    routing, token, _ = _triton_ops.route(ids, n_experts)
    offsets, used = routing.offsets, int(routing.offsets[-1])
    qa, sa = ops.quantize_rows(torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16), False)
    if call_site == "up":
        _, qt, s = ops.quantize_weight_both(torch.randn(n_experts, k, n, device="cuda") / k**0.5, False, ops.UP_FOLD)
        b = ops.weight_operand(None, qt, s, False, "fwd", ops.UP_FOLD)
    else:
        q, _, s = ops.quantize_weight_both(torch.randn(n_experts, n, k, device="cuda") / n**0.5, False, ops.DOWN_FOLD)
        b = ops.weight_operand(q, None, s, False, "dgrad", ops.DOWN_FOLD)
    for scales in ("real", "folded"):
        if scales == "folded":
            b = ops.WeightOperand(b.q, ops._unit_scale(b.q.device), b.strides, (0, 0, 0))
        poison_allocator(token.shape[0] * n * 4)
        with ops.use_fp8_gemm_kernel("cutlass"):
            theirs = ops.gemm_rows(qa, sa, b, offsets, n, k, torch.bfloat16, True, a_idx=token)
        with ops.use_fp8_gemm_kernel("triton"):
            ours = ops.gemm_rows(qa, sa, b, offsets, n, k, torch.bfloat16, True, a_idx=token)
        bad = mismatches(theirs[:used], ours[:used])
        record(f"quack gathered gemm = ours bitwise, {scales} scales, {name}", bad == 0, mismatches=bad, rows=used)


def check_cutlass_layer(name: str, tokens: int, top_k: int, d: int, h: int, n_experts: int) -> None:
    """The routed fp8 layer (fp8 dW, fast accumulation) with the CUTLASS kernel forced and with ours only: the
    same output and gradients, bit for bit (skewed routing, every other expert empty, 5% of slots dropped)."""
    from nmoe.kernels import _lowprec_ops as ops

    g = torch.Generator(device="cuda").manual_seed(1)
    p = torch.rand(n_experts, device="cuda", generator=g) ** 3 * (torch.arange(n_experts, device="cuda") % 2 == 0)
    ids = torch.multinomial(p.expand(tokens, -1), top_k, generator=g)
    ids[torch.rand(tokens, top_k, device="cuda", generator=g) < 0.05] = -1
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(tokens, top_k, device="cuda")
    w_up = torch.randn(n_experts, d, 2 * h, device="cuda") / d**0.5
    w_down = torch.randn(n_experts, h, d, device="cuda") / h**0.5
    dy = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    results = {}
    for kernel in ("cutlass", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, weights, w_up, w_down)]
        poison_allocator(tokens * top_k * (d + 3 * h) * 8)
        with ops.use_fp8_gemm_kernel(kernel):
            y = nk.moe_experts_fp8(x=leaves[0], topk_ids=ids, topk_weights=leaves[1], w_up=leaves[2],
                                   w_down=leaves[3], scaling="rowwise", wgrad_fp8=True, fast_accum=True)  # fmt: skip
            results[kernel] = (y, *torch.autograd.grad(y, leaves, dy))
    bad = {n: mismatches(a, b) for n, a, b in zip(("y", "dx", "d_weights", "dw_up", "dw_down"), *results.values())}
    record(f"moe_experts_fp8 cutlass = triton bitwise, {name}", not any(bad.values()), **bad)


def check_cutlass_no_host_sync() -> None:
    """The routed fp8 layer forced onto the CUTLASS kernel, fwd+bwd, after a warm-up: no host synchronisation."""
    from nmoe.kernels import _lowprec_ops as ops

    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(1024, 6, device="cuda", requires_grad=True)
    w_up = torch.randn(64, 256, 256, device="cuda", requires_grad=True)
    w_down = torch.randn(64, 128, 256, device="cuda", requires_grad=True)
    ids = torch.rand(1024, 64, device="cuda").topk(6, dim=1).indices

    def run():
        y = nk.moe_experts_fp8(x, ids, weights, w_up, w_down, "rowwise", **FP8_WGRAD_FAST)
        torch.autograd.grad(y, (x, weights, w_up, w_down), torch.ones_like(y))

    with ops.use_fp8_gemm_kernel("cutlass"):
        record_no_host_sync(run, "no host synchronisation in moe_experts_fp8 on the CUTLASS kernel")


def check_auto_picks(tokens: int, top_k: int, d: int, h: int, n_experts: int) -> None:
    """Under NMOE_KERNELS_FP8_GEMM=auto the routed layer's two plain GEMMs are timed once on each kernel and the
    pick is kept (recorded here: which kernel won at moonlet's shapes)."""
    from nmoe.kernels import _lowprec_ops as ops

    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.rand(tokens, n_experts, device="cuda").topk(top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, device="cuda", requires_grad=True)
    w_up = (torch.randn(n_experts, d, 2 * h, device="cuda") / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, device="cuda") / h**0.5).requires_grad_()
    ops.CUTLASS_PICKS.clear()
    with ops.use_fp8_gemm_kernel("auto"):
        y = nk.moe_experts_fp8(x, ids, weights, w_up, w_down, "rowwise", **FP8_WGRAD_FAST)
        torch.autograd.grad(y, (x, weights, w_up, w_down), torch.ones_like(y))
    picks = {
        f"N={k[0]} K={k[1]} E={k[2]} rows<={k[3]}{' gathered' if k[5] else ''}": "cutlass" if v else "triton"
        for k, v in ops.CUTLASS_PICKS.items()
    }
    from nmoe.kernels import _quack_gemm

    want = 2 if _quack_gemm.missing() else 4  # the gathering GEMMs have a second kernel only with quack
    record(f"auto picks a kernel for the routed layer's {want} GEMMs that have two, moonlet", len(picks) == want,
           **picks)  # fmt: skip


BF16_WGRAD_FAST = dict(wgrad_fp8=False, fast_accum=True)
FP8_WGRAD_FAST = dict(wgrad_fp8=True, fast_accum=True)


def check_every_config() -> None:
    """Autotuning keeps only the fastest config's output: force each fp8 GEMM config in turn and check it.

    expert_mlp_fp8 runs every fp8 GEMM kernel (plain, fused SwiGLU+quantise, SwiGLU backward, dW).
    """
    from nmoe.kernels import _lowprec_ops as ops
    from nmoe.kernels import _triton_ops

    tuners = [*ops._GMM.values(), *ops._GMM_TMA.values(), ops._GMM_DW]
    originals = [t.configs for t in tuners]
    try:
        for i in range(max(len(c) for c in originals)):
            for tuner, configs in zip(tuners, originals):
                tuner.configs = [configs[min(i, len(configs) - 1)]]
                tuner.cache.clear()
            for scaling in R.SCALINGS:
                check_expert_mlp_fp8(f"config #{i}", 8192, 1024, 704, 8, "skewed", scaling)
            check_expert_mlp_fp8(f"config #{i}", 8192, 1024, 704, 8, "skewed", "rowwise", **BF16_WGRAD_FAST)
            check_moe_experts_fp8(f"config #{i}", 2048, 4, 1024, 704, 8, "rowwise", **BF16_WGRAD_FAST)
            check_moe_experts_fp8(f"config #{i}", 2048, 4, 1024, 704, 8, "rowwise", **FP8_WGRAD_FAST)
            check_moe_experts_fp8(f"config #{i}", 2048, 4, 1024, 704, 8, "blockwise")
            with _triton_ops.use_gemm_variant("tma"):
                for scaling in R.SCALINGS:
                    check_expert_mlp_fp8(f"TMA config #{i}", 8192, 1024, 704, 8, "skewed", scaling, wgrad_fp8=False)
                check_expert_mlp_fp8(f"TMA config #{i}", 8192, 1024, 704, 8, "skewed", "rowwise", **BF16_WGRAD_FAST)
    finally:
        for tuner, configs in zip(tuners, originals):
            tuner.configs = configs
            tuner.cache.clear()


def check_nvfp4_adamw(shape: tuple[int, ...], rule: str, launch: tuple[int, int] | None = None) -> None:
    """Two steps of the fused NVFP4 AdamW bitwise against the reference, under the shipped launch or
    launch = (16-blocks per program, warps)."""
    from nmoe.kernels import _lowprec_ops

    shipped = _lowprec_ops.NVFP4_ADAMW_BLOCKS, _lowprec_ops.NVFP4_WARPS
    _lowprec_ops.NVFP4_ADAMW_BLOCKS, _lowprec_ops.NVFP4_WARPS = launch or shipped
    try:
        _check_nvfp4_adamw(
            shape, rule, "" if launch in (None, shipped) else f" [{launch[0]} blocks, {launch[1]} warps]"
        )
    finally:
        _lowprec_ops.NVFP4_ADAMW_BLOCKS, _lowprec_ops.NVFP4_WARPS = shipped


def _check_nvfp4_adamw(shape: tuple[int, ...], rule: str, tag: str) -> None:
    w = torch.randn(shape, device="cuda") * 0.02
    q = nk.quantize_nvfp4(w)
    q_ref = R.NVFP4Tensor(*(t.clone() for t in q))
    m, v = torch.zeros(shape, device="cuda"), torch.zeros(shape, device="cuda")
    m_ref, v_ref = m.clone(), v.clone()
    residual = torch.zeros(shape, device="cuda", dtype=torch.bfloat16) if rule == "residual" else None
    r_ref = None if residual is None else residual.clone()
    bad: dict[str, int] = {}
    for step in (1, 2):
        grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        kw = dict(step=step, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, rule=rule, seed=1234)
        got = nk.nvfp4_adamw_(q, grad, m, v, residual=residual, **kw)
        want = R.nvfp4_adamw_(q_ref, grad, m_ref, v_ref, residual=r_ref, **kw)
        pairs = list(zip(q._fields, q, q_ref)) + [("exp_avg", m, m_ref), ("exp_avg_sq", v, v_ref)]
        if residual is not None:
            pairs.append(("residual", residual, r_ref))
        for name, a, b in pairs:
            bad[f"step{step}_{name}"] = mismatches(a, b)
        bad[f"step{step}_flips_diff"] = int(got.flips) - int(want.flips)
    flip_frac = int(got.flips) / got.numel
    record(f"nvfp4_adamw_ {rule} {shape}{tag}", all(v == 0 for v in bad.values()), flip_frac=flip_frac, **bad)


def check_no_host_sync() -> None:
    offsets, m = grouped_offsets(8192, 64, "skewed")
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_up = torch.randn(64, 256, 256, device="cuda", requires_grad=True)
    w_down = torch.randn(64, 128, 256, device="cuda", requires_grad=True)
    q = nk.quantize_nvfp4(w_up.detach())
    state = [torch.zeros(w_up.shape, device="cuda") for _ in range(2)]
    residual = torch.zeros(w_up.shape, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(1024, 64, device="cuda").topk(6, dim=1).indices
    weights = torch.rand(1024, 6, device="cuda", requires_grad=True)
    hyper = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, seed=0)

    def run():
        for scaling in R.SCALINGS:
            y = nk.expert_mlp_fp8(x, offsets, w_up, w_down, scaling)
            torch.autograd.grad(y, (x, w_up, w_down), torch.ones_like(y))
            y = nk.grouped_mm_fp8(x, w_up, offsets, scaling)
            torch.autograd.grad(y, (x, w_up), torch.ones_like(y))
        y = nk.expert_mlp_fp8(x, offsets, w_up, w_down, "rowwise", **BF16_WGRAD_FAST)
        torch.autograd.grad(y, (x, w_up, w_down), torch.ones_like(y))
        y = nk.moe_experts_fp8(x[:1024], ids, weights, w_up, w_down, "rowwise", **BF16_WGRAD_FAST)
        torch.autograd.grad(y, (x, weights, w_up, w_down), torch.ones_like(y))
        for rule in R.RULES:
            nk.nvfp4_adamw_(
                q, w_up.detach(), *state, **hyper, rule=rule, residual=residual if rule == "residual" else None
            )
        nk.dequantize_nvfp4(q)

    record_no_host_sync(run, "no host synchronisation in fp8 GEMMs fwd+bwd, nvfp4_adamw_, dequantize_nvfp4")


def record_no_host_sync(run, name: str) -> None:
    """Run once to warm up (autotuning and kernel picks synchronise), then again with host syncs made errors."""
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        record(name, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_fp8_compile() -> None:
    for recipe in (BF16_WGRAD_FAST, FP8_WGRAD_FAST):
        _check_fp8_compile(recipe)


def _check_fp8_compile(recipe: dict) -> None:
    """The fp8 routed experts (the moe_experts_fp8 custom op, float32 masters under bf16 tokens) inside a compiled
    fullgraph (inductor) give eager's loss and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    n_experts, d, h = 16, 256, 128
    w_up = (torch.randn(n_experts, d, 2 * h, device="cuda") / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, device="cuda") / h**0.5).requires_grad_()
    gate = torch.randn(n_experts, d, device="cuda").requires_grad_()
    x = torch.randn(4096, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def loss_fn(x):
        weights, ids = torch.sigmoid(x.float() @ gate.T).topk(4, dim=1)
        ids = torch.where(weights > 0.95, -1, ids)  # dropped slots
        y = nk.moe_experts_fp8(x, ids, weights, w_up, w_down, "rowwise", **recipe)
        return torch.tanh(y.float()).square().mean()

    def loss_and_grads(fn):
        loss = fn(x)
        return [loss.detach(), *torch.autograd.grad(loss, [x, gate, w_up, w_down])]

    eager = loss_and_grads(loss_fn)
    compiled = loss_and_grads(torch.compile(loss_fn, fullgraph=True))
    errs = {f"out{i}": rel_err(c, e) for i, (c, e) in enumerate(zip(compiled, eager))}
    label = "".join(f" {k}={v}" for k, v in recipe.items())
    record(f"fullgraph torch.compile (inductor) of moe_experts_fp8{label} matches eager", max(errs.values()) < 1e-2,
           **errs)  # fmt: skip


def check_refusals() -> None:
    offsets = torch.tensor([4], dtype=torch.int32, device="cuda")
    cases = {
        "misaligned K": lambda: nk.grouped_mm_fp8(
            torch.randn(4, 24, device="cuda"), torch.randn(1, 24, 16, device="cuda"), offsets
        ),
        "moe_experts_fp8 misaligned H": lambda: nk.moe_experts_fp8(
            torch.randn(4, 16, device="cuda"),
            torch.zeros(4, 1, dtype=torch.int64, device="cuda"),
            torch.ones(4, 1, device="cuda"),
            torch.randn(1, 16, 40, device="cuda"),
            torch.randn(1, 20, 16, device="cuda"),
        ),
        "fp16": lambda: nk.grouped_mm_fp8(
            torch.randn(4, 16, device="cuda").half(), torch.randn(1, 16, 16, device="cuda"), offsets
        ),
        "nvfp4 tensor-core GEMM on this GPU": lambda: nk.check_precision_supported("nvfp4_gemm", "cuda"),
    }
    for name, call in cases.items():
        try:
            call()
            record(f"refuses {name}", False)
        except nk.UnsupportedInput as err:
            record(f"refuses {name}", True, message=str(err))
    record("precision nvfp4 on this GPU", True, meaning=nk.check_precision_supported("nvfp4", "cuda"))
    record("precision fp8 on this GPU", True, meaning=nk.check_precision_supported("fp8", "cuda"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only-nvfp4", action="store_true", help="the NVFP4 quantiser and AdamW checks only")
    parser.add_argument("--only-fp8-mlp", action="store_true", help="the expert MLP recipes and every config only")
    parser.add_argument(
        "--adamw-configs", default="", help="with --only-nvfp4: also under each launch, e.g. 32x2,16x1 (blocks x warps)"
    )
    parser.add_argument("--only-fp8-wgrad", action="store_true", help="the rowwise fp8 dW recipe's checks only")
    parser.add_argument("--only-quantisers", action="store_true", help="the quantiser and transpose checks only")
    parser.add_argument(
        "--only-cutlass", action="store_true", help="torch's and quack's fp8 GEMMs against ours only (needs quack)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_lowprec.py needs a CUDA GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    start = time.time()
    moonlet_rows = 16384 * 6
    checks = [lambda: check_quantisers(moonlet_rows, 1024, 704, 64)]
    for scaling in R.SCALINGS:
        checks += [
            lambda s=scaling: check_grouped_mm_fp8("moonlet up", moonlet_rows, 1024, 1408, 64, "balanced", s),
            lambda s=scaling: check_grouped_mm_fp8(
                "moonlet down skewed+tail", moonlet_rows, 704, 1024, 64, "skewed", s
            ),
            lambda s=scaling: check_grouped_mm_fp8("one huge group", 40000, 1024, 1024, 64, "one_huge", s),
            lambda s=scaling: check_expert_mlp_fp8("moonlet", moonlet_rows, 1024, 704, 64, "balanced", s),
            lambda s=scaling: check_expert_mlp_fp8("speedrun-256 skewed", 8192 * 8, 1024, 512, 256, "skewed", s),
        ]
    checks += [
        lambda: check_expert_mlp_fp8("moonlet", moonlet_rows, 1024, 704, 64, "balanced", "rowwise", **BF16_WGRAD_FAST),
        lambda: check_expert_mlp_fp8("moonlet", moonlet_rows, 1024, 704, 64, "balanced", "blockwise", wgrad_fp8=False),
        lambda: check_expert_mlp_fp8(
            "speedrun-256 skewed", 8192 * 8, 1024, 512, 256, "skewed", "rowwise", **BF16_WGRAD_FAST
        ),
    ]
    checks += [
        lambda: check_moe_experts_fp8("moonlet", 16384, 6, 1024, 704, 64, "rowwise", **BF16_WGRAD_FAST),
        lambda: check_moe_experts_fp8("moonlet", 16384, 6, 1024, 704, 64, "rowwise"),
        lambda: check_moe_experts_fp8("moonlet", 16384, 6, 1024, 704, 64, "blockwise", wgrad_fp8=False),
        lambda: check_expert_mlp_fp8("moonlet", moonlet_rows, 1024, 704, 64, "balanced", "rowwise", **FP8_WGRAD_FAST),
        lambda: check_moe_experts_fp8("moonlet", 16384, 6, 1024, 704, 64, "rowwise", **FP8_WGRAD_FAST),
        lambda: check_moe_experts_fp8("moonlet", 16384, 6, 1024, 704, 64, "rowwise", "slices", **FP8_WGRAD_FAST),
        lambda: check_moe_experts_fp8("moonlet", 16384, 6, 1024, 704, 64, "rowwise", "zero_init", **FP8_WGRAD_FAST),
    ]
    checks += [
        lambda: check_cutlass_gemm("moonlet down", moonlet_rows, 704, 1024, 64, "balanced"),
        lambda: check_cutlass_gemm("moonlet dgrad up skewed+tail", moonlet_rows, 1408, 1024, 64, "skewed"),
        lambda: check_cutlass_gemm("speedrun-256 down skewed+tail", 8192 * 8, 512, 1024, 256, "skewed"),
        lambda: check_cutlass_layer("moonlet", 16384, 6, 1024, 704, 64),
        lambda: check_cutlass_layer("speedrun-256", 8192, 8, 1024, 512, 256),
    ]
    fp8_wgrad = checks[-9:]
    cutlass = [  # torch's kernel picks other tiles for few rows per group, narrow N and large problems
        *checks[-5:],
        lambda: check_quack_gemm("moonlet up", 16384, 6, 1024, 1408, 64, "up"),
        lambda: check_quack_gemm("moonlet dgrad down", 16384, 6, 1024, 704, 64, "dgrad down"),
        lambda: check_quack_gemm("speedrun-256 up", 8192, 8, 1024, 1024, 256, "up"),
        lambda: check_cutlass_gemm("~100 rows per group", 6400, 704, 1024, 64, "balanced"),
        lambda: check_cutlass_gemm("N 128", moonlet_rows, 1024, 128, 64, "skewed"),
        lambda: check_cutlass_gemm("large", 65536, 2048, 2816, 8, "balanced"),
        check_cutlass_no_host_sync,
        lambda: check_auto_picks(16384, 6, 1024, 704, 64),
    ]
    recipes = checks[-15:]
    checks += [*cutlass[5:], check_every_config]
    checks += [lambda r=rule: check_nvfp4_adamw((64, 1024, 1408), r) for rule in R.RULES]
    checks += [check_no_host_sync, check_fp8_compile, check_refusals]
    if args.only_fp8_mlp:
        checks = [checks[0], *recipes, check_every_config, check_no_host_sync, check_fp8_compile]
    if args.only_fp8_wgrad:
        checks = [checks[0], *fp8_wgrad, lambda: _check_fp8_compile(FP8_WGRAD_FAST)]
    if args.only_cutlass:
        checks = cutlass
    if args.only_quantisers:
        checks = [checks[0]]
    if args.only_nvfp4:
        launches = [None] + [tuple(int(x) for x in c.split("x")) for c in args.adamw_configs.split(",") if c]
        checks = [
            lambda r=rule, c=launch: check_nvfp4_adamw((64, 1024, 1408), r, c)
            for launch in launches
            for rule in R.RULES
        ]
    for check in checks:
        try:
            check()
        except Exception as err:  # keep going: one device call should report every check
            record("crashed", False, error=repr(err)[:400], trace=traceback.format_exc(limit=6)[-1500:])
        torch.cuda.empty_cache()
    failed = [r for r in RESULTS if not r["ok"]]
    print("\n| check | ok |\n| --- | --- |")
    for r in RESULTS:
        print(f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} |")
    print(
        f"\ngpu_lowprec: {len(RESULTS) - len(failed)}/{len(RESULTS)} passed on {torch.cuda.get_device_name()} "
        f"in {time.time() - start:.0f}s"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_lowprec.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
