"""The public ops as torch.library custom ops (namespace "nmoe"), so that torch.compile traces them whole.

Each op picks its implementation at run time (Triton on CUDA, the plain-PyTorch reference on CPU, which may
synchronise: it runs inside the op, out of the compiler's sight). Fake implementations give output shapes and
run the same input checks, so a compiled graph refuses bad input at trace time. Ops return the tensors their
backward needs as extra (non-differentiable) outputs; the public functions in `nmoe.kernels.api` return only
the result. Backward formulas are ops too (autograd does not record inside an op).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from nmoe.kernels import _dispatch, _linear_ce, reference, reference_lowprec


def _triton_ops():
    from nmoe.kernels import _triton_ops

    return _triton_ops


# ------------------------------------------------------------------------------------------------ grouped_mm


@torch.library.custom_op("nmoe::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """x[M,K] @ w[e][K,N] per expert group (offsets[E] int32) -> [M,N]."""
    if _dispatch.grouped_mm_on_triton(x, w, offsets):
        return _triton_ops().gmm_forward(x, w, offsets)
    return reference.grouped_mm(x, w, offsets)


@grouped_mm.register_fake
def _(x, w, offsets):
    _dispatch.grouped_mm_on_triton(x, w, offsets)
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("nmoe::grouped_mm_backward", mutates_args=())
def grouped_mm_backward(
    dy: Tensor, x: Tensor, w: Tensor, offsets: Tensor, need_dx: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    """dy[M,N] -> (dx[M,K], dw[E,K,N]); an empty [0] tensor for a gradient not asked for."""
    if _dispatch.grouped_mm_on_triton(x, w, offsets):
        return _triton_ops().gmm_backward(dy, x, w, offsets, need_dx, need_dw)
    dx, dw = reference.grouped_mm_backward(dy, x, w, offsets)
    return (dx if need_dx else dy.new_empty(0)), (dw if need_dw else dy.new_empty(0))


@grouped_mm_backward.register_fake
def _(dy, x, w, offsets, need_dx, need_dw):
    return (x.new_empty(x.shape) if need_dx else dy.new_empty(0)), (
        w.new_empty(w.shape) if need_dw else dy.new_empty(0)
    )


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_grad(ctx, dy):
    x, w, offsets = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.nmoe.grouped_mm_backward(dy, x, w, offsets, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


grouped_mm.register_autograd(_grouped_mm_grad, setup_context=_grouped_mm_setup)


# ------------------------------------------------------------------------------------------------ sort_by_expert


@torch.library.custom_op("nmoe::sort_by_expert", mutates_args=())
def sort_by_expert(topk_ids: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """topk_ids[T,K] in [-1,E) -> (counts[E] int32, offsets[E] int32, order[T*K] int64); not differentiable."""
    if _dispatch.use_triton(topk_ids):
        return tuple(_triton_ops().route(topk_ids.contiguous(), n_experts)[0])
    return tuple(t.clone() for t in reference.sort_by_expert(topk_ids, n_experts))


@sort_by_expert.register_fake
def _(topk_ids, n_experts):
    _dispatch.use_triton(topk_ids)
    ints = topk_ids.new_empty(n_experts, dtype=torch.int32)
    return ints, torch.empty_like(ints), topk_ids.new_empty(topk_ids.numel(), dtype=torch.int64)


# ------------------------------------------------------------------------------------------------ expert_mlp


@torch.library.custom_op("nmoe::expert_mlp", mutates_args=())
def expert_mlp(rows: Tensor, offsets: Tensor, w_up: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """rows[M,D] grouped by expert -> (y[M,D], pre[M,2H], act[M,H]); pre/act are saved for backward."""
    if _dispatch.experts_on_triton(rows, w_up, w_down, offsets):
        return _triton_ops().expert_mlp_forward(rows, offsets, w_up, w_down)
    return reference.expert_mlp_parts(rows, offsets, w_up, w_down)


@expert_mlp.register_fake
def _(rows, offsets, w_up, w_down):
    _dispatch.experts_on_triton(rows, w_up, w_down, offsets)
    m, h2 = rows.shape[0], w_up.shape[2]
    return rows.new_empty(rows.shape), rows.new_empty(m, h2), rows.new_empty(m, h2 // 2)


@torch.library.custom_op("nmoe::expert_mlp_backward", mutates_args=())
def expert_mlp_backward(
    dy: Tensor, rows: Tensor, offsets: Tensor, w_up: Tensor, w_down: Tensor, pre: Tensor, act: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """dy[M,D] -> (d_rows[M,D], dw_up[E,D,2H], dw_down[E,H,D])."""
    if _dispatch.experts_on_triton(rows, w_up, w_down, offsets):
        return _triton_ops().expert_mlp_backward(dy, rows, offsets, w_up, w_down, pre, act)
    return reference.expert_mlp_backward(dy, rows, offsets, w_up, w_down, pre, act)


@expert_mlp_backward.register_fake
def _(dy, rows, offsets, w_up, w_down, pre, act):
    return rows.new_empty(rows.shape), w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape)


def _expert_mlp_setup(ctx, inputs, output):
    rows, offsets, w_up, w_down = inputs
    _, pre, act = output
    ctx.mark_non_differentiable(pre, act)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    ctx.save_for_backward(rows, offsets, w_up, w_down, pre, act)


def _expert_mlp_grad(ctx, dy, _d_pre, _d_act):
    rows, offsets, w_up, w_down, pre, act = ctx.saved_tensors
    d_rows, dw_up, dw_down = torch.ops.nmoe.expert_mlp_backward(dy, rows, offsets, w_up, w_down, pre, act)
    return d_rows, None, dw_up, dw_down


expert_mlp.register_autograd(_expert_mlp_grad, setup_context=_expert_mlp_setup)


# ----------------------------------------------------------------------------------------------- moe_experts


def _gemm_weights(x: Tensor, w_up: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (w_up, w_down as the GEMMs read them: in x's dtype, cast when they are float32 masters under bf16 x;
    the cast copies, or [0] placeholders when no cast was needed: an op's outputs may not alias its inputs)."""
    if w_up.dtype == x.dtype and w_down.dtype == x.dtype:
        return w_up, w_down, x.new_empty(0), x.new_empty(0)
    gu, gd = w_up.to(x.dtype), w_down.to(x.dtype)
    return gu, gd, gu, gd


def _saved_gemm_weights(x, w_up, w_down, cast_up, cast_down) -> tuple[Tensor, Tensor]:
    if w_up.dtype == x.dtype and w_down.dtype == x.dtype:
        return w_up, w_down
    return cast_up, cast_down


@torch.library.custom_op("nmoe::moe_experts", mutates_args=())
def moe_experts(
    x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_up: Tensor, w_down: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (y[T,D], pre[R,2H], act[R,H], offsets[E] int32, order[R] int64, token[R] int32, pos[R] int32, the weights
    cast to x's dtype (or [0] each when they were in it)), R = T*K."""
    gu, gd, cast_up, cast_down = _gemm_weights(x, w_up, w_down)
    if _dispatch.experts_on_triton(x, gu, gd, topk_ids, topk_weights):
        parts = _triton_ops().moe_forward(x, topk_ids, topk_weights, gu, gd)
    else:
        parts = reference.moe_experts_parts(x, topk_ids, topk_weights, gu, gd)
    return (*parts, cast_up, cast_down)


@moe_experts.register_fake
def _(x, topk_ids, topk_weights, w_up, w_down):
    _dispatch.experts_on_triton(x, w_up.to(x.dtype), w_down.to(x.dtype), topk_ids, topk_weights)
    rows, h2 = topk_ids.numel(), w_up.shape[2]
    cast = w_up.dtype != x.dtype or w_down.dtype != x.dtype

    def ints(n, dtype):
        return x.new_empty(n, dtype=dtype)

    return (
        x.new_empty(x.shape),
        x.new_empty(rows, h2),
        x.new_empty(rows, h2 // 2),
        ints(w_up.shape[0], torch.int32),
        ints(rows, torch.int64),
        ints(rows, torch.int32),
        ints(rows, torch.int32),
        x.new_empty(w_up.shape if cast else (0,)),
        x.new_empty(w_down.shape if cast else (0,)),
    )


@torch.library.custom_op("nmoe::moe_experts_backward", mutates_args=())
def moe_experts_backward(
    dy: Tensor,
    x: Tensor,
    topk_weights: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    cast_up: Tensor,
    cast_down: Tensor,
    offsets: Tensor,
    order: Tensor,
    token: Tensor,
    pos: Tensor,
    pre: Tensor,
    act: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dy[T,D] -> (dx[T,D], d_topk_weights[T,K], dw_up[E,D,2H], dw_down[E,H,D]); dW in the weights' own dtype (from
    the float32 accumulator for float32 masters)."""
    saved = (offsets, order, token, pos, pre, act)
    gu, gd = _saved_gemm_weights(x, w_up, w_down, cast_up, cast_down)
    if _dispatch.experts_on_triton(x, gu, gd, topk_weights):
        return _triton_ops().moe_backward(dy, x, topk_weights, gu, gd, *saved, dw_dtype=w_up.dtype)
    dx, d_weights, dw_up, dw_down = reference.moe_experts_backward(dy, x, topk_weights, gu, gd, *saved)
    return dx, d_weights, dw_up.to(w_up.dtype), dw_down.to(w_down.dtype)


@moe_experts_backward.register_fake
def _(dy, x, topk_weights, w_up, w_down, cast_up, cast_down, offsets, order, token, pos, pre, act):
    return (
        x.new_empty(x.shape),
        topk_weights.new_empty(topk_weights.shape),
        w_up.new_empty(w_up.shape),
        w_down.new_empty(w_down.shape),
    )


def _moe_setup(ctx, inputs, output):
    x, _, topk_weights, w_up, w_down = inputs
    _, pre, act, offsets, order, token, pos, cast_up, cast_down = output
    ctx.mark_non_differentiable(pre, act, offsets, order, token, pos, cast_up, cast_down)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    ctx.save_for_backward(x, topk_weights, w_up, w_down, cast_up, cast_down, offsets, order, token, pos, pre, act)


def _moe_grad(ctx, dy, *_unused):
    x, topk_weights, w_up, w_down, *saved = ctx.saved_tensors
    dx, d_weights, dw_up, dw_down = torch.ops.nmoe.moe_experts_backward(dy, x, topk_weights, w_up, w_down, *saved)
    return dx, None, d_weights, dw_up, dw_down


moe_experts.register_autograd(_moe_grad, setup_context=_moe_setup)


# ------------------------------------------------------------------------------------------- moe_experts_fp8


def _fp8_experts_on_triton(x: Tensor, w_down: Tensor, *others: Tensor) -> bool:
    """Device and alignment checks of the fp8 experts (dtypes are checked by the public function)."""
    if not _dispatch.use_triton(x, w_down, *others):
        return False
    _dispatch.check_aligned(D=x.shape[1], H=w_down.shape[1])
    return True


@torch.library.custom_op("nmoe::moe_experts_fp8", mutates_args=())
def moe_experts_fp8(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    scaling: str,
    wgrad_fp8: bool,
    fast_accum: bool,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:
    """-> (y[T,D], offsets[E] int32, order[R] int64, token[R] int32, pos[R] int32, pre[R,2H], act, act_scales,
    x_codes, x_scales, the weights' e4m3 codes (as uint8: generic graph tooling cannot reduce float8) and scales the
    backward reuses: q_up[E,D,2H], s_up, q_down[E,H,D], s_down), R = T*K; the inputs checked by
    `nmoe.kernels.moe_experts_fp8`. act, act_scales as `reference_lowprec.saved_act` says: act[R,H] in x.dtype and
    [0]; act's folded codes [R,H] uint8 and their float32 row scales [R]; or [0] and [0]. x_codes [T,D] uint8 and
    x_scales [T] float32: x's rowwise e4m3 rows when act is kept as codes (the fp8 dW of the up projection), else
    [0] and [0]."""
    if _fp8_experts_on_triton(x, w_down, topk_ids, topk_weights, w_up):
        from nmoe.kernels import _lowprec_ops

        return _lowprec_ops.moe_fp8_forward(x, topk_ids, topk_weights, w_up, w_down, scaling, wgrad_fp8, fast_accum)
    y, offsets, order, token, pre = reference_lowprec.moe_experts_fp8_forward(
        x, topk_ids, topk_weights, w_up, w_down, scaling, torch.float32, wgrad_fp8
    )
    pos = torch.empty_like(order, dtype=torch.int32)
    pos[order] = torch.arange(order.shape[0], dtype=torch.int32, device=order.device)
    codes = (*_reference_codes(w_up, scaling, "fwd"), *_reference_codes(w_down, scaling, "dgrad"))
    act, act_scales = _reference_act(pre, w_down, offsets, scaling, wgrad_fp8)
    x_codes = _reference_x_codes(x, reference_lowprec.saved_act(scaling, wgrad_fp8))
    return y, offsets, order, token.to(torch.int32), pos, pre, act, act_scales, *x_codes, *codes


def _reference_x_codes(x: Tensor, kept: str | None) -> tuple[Tensor, Tensor]:
    """x_codes and x_scales as the GPU path keeps them (the CPU backward recomputes its own)."""
    if kept != "codes":
        return x.new_empty(0, dtype=torch.uint8), x.new_empty(0, dtype=torch.float32)
    q, scales = reference_lowprec.quantize_fp8_rowwise(x)
    return q.view(torch.uint8), scales


def _reference_act(pre: Tensor, w_down: Tensor, offsets: Tensor, scaling: str, wgrad_fp8: bool):
    """act and act_scales as the GPU path keeps them (the CPU backward recomputes its own)."""
    kept = reference_lowprec.saved_act(scaling, wgrad_fp8)
    none = pre.new_empty(0, dtype=torch.float32)
    if kept is None:
        return pre.new_empty(0), none
    act = reference_lowprec.swiglu_f32(pre).to(pre.dtype)
    if kept == "values":
        return act, none
    _, s_down = reference_lowprec.quantize_weight(w_down, scaling, "dgrad")
    q, scales = reference_lowprec.folded_rows(act, s_down, offsets)
    return q.view(torch.uint8), scales


def _reference_codes(w: Tensor, scaling: str, scale_pass: str) -> tuple[Tensor, Tensor]:
    """The codes and scales the GPU path keeps for the backward (the CPU backward recomputes its own)."""
    q, scales = reference_lowprec.quantize_weight(w, scaling, scale_pass)
    return q.contiguous().view(torch.uint8), scales.contiguous()


def _fake_codes(w: Tensor, scaling: str, scale_dim: int) -> tuple[Tensor, Tensor]:
    e, k, n = w.shape
    if scaling == "blockwise":
        block = reference_lowprec.FP8_BLOCK
        scales = w.new_empty(e, -(-k // block), -(-n // block), dtype=torch.float32)
    else:
        scales = w.new_empty(e, w.shape[scale_dim], dtype=torch.float32)
    return w.new_empty(e, k, n, dtype=torch.uint8), scales


def _fake_act(x: Tensor, rows: int, h: int, kept: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """act, act_scales, x_codes, x_scales."""
    codes = kept == "codes"
    scales = x.new_empty(rows if codes else 0, dtype=torch.float32)
    x_codes = (
        x.new_empty(x.shape if codes else 0, dtype=torch.uint8),
        x.new_empty(x.shape[0] if codes else 0, dtype=torch.float32),
    )
    if kept is None:
        return x.new_empty(0), scales, *x_codes
    return x.new_empty(rows, h, dtype=torch.uint8 if codes else x.dtype), scales, *x_codes


@moe_experts_fp8.register_fake
def _(x, topk_ids, topk_weights, w_up, w_down, scaling, wgrad_fp8, fast_accum):
    _fp8_experts_on_triton(x, w_down, topk_ids, topk_weights, w_up)
    rows, h2 = topk_ids.numel(), w_up.shape[2]

    def ints(n, dtype):
        return x.new_empty(n, dtype=dtype)

    return (
        x.new_empty(x.shape),
        ints(w_up.shape[0], torch.int32),
        ints(rows, torch.int64),
        ints(rows, torch.int32),
        ints(rows, torch.int32),
        x.new_empty(rows, h2),
        *_fake_act(x, rows, h2 // 2, reference_lowprec.saved_act(scaling, wgrad_fp8)),
        *_fake_codes(w_up, scaling, 2),  # w_up: forward scales, one per output column
        *_fake_codes(w_down, scaling, 1),  # w_down: dgrad scales, one per row
    )


@torch.library.custom_op("nmoe::moe_experts_fp8_backward", mutates_args=())
def moe_experts_fp8_backward(
    dy: Tensor,
    x: Tensor,
    topk_weights: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    offsets: Tensor,
    order: Tensor,
    token: Tensor,
    pos: Tensor,
    pre: Tensor,
    act: Tensor,
    act_scales: Tensor,
    x_codes: Tensor,
    x_scales: Tensor,
    q_up: Tensor,
    s_up: Tensor,
    q_down: Tensor,
    s_down: Tensor,
    scaling: str,
    wgrad_fp8: bool,
    fast_accum: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dy[T,D] -> (dx[T,D], d_topk_weights[T,K], dw_up[E,D,2H], dw_down[E,H,D]) in the inputs' dtypes."""
    saved = (offsets, order, token, pos, pre, act, act_scales, x_codes, x_scales, q_up, s_up, q_down, s_down)
    if _fp8_experts_on_triton(x, w_down, topk_weights, w_up):
        from nmoe.kernels import _lowprec_ops

        return _lowprec_ops.moe_fp8_backward(dy, x, topk_weights, w_up, w_down, *saved, scaling, wgrad_fp8, fast_accum)
    return reference_lowprec.moe_experts_fp8_backward(
        dy, x, topk_weights, w_up, w_down, offsets, order, token, pre, scaling, torch.float32, wgrad_fp8
    )


@moe_experts_fp8_backward.register_fake
def _(dy, x, topk_weights, w_up, w_down, offsets, order, token, pos, pre, act, act_scales, x_codes, x_scales, q_up,
      s_up, q_down, s_down, scaling, wgrad_fp8, fast_accum):  # fmt: skip
    return (
        x.new_empty(x.shape),
        topk_weights.new_empty(topk_weights.shape),
        w_up.new_empty(w_up.shape),
        w_down.new_empty(w_down.shape),
    )


def _moe_fp8_setup(ctx, inputs, output):
    x, _, topk_weights, w_up, w_down, *recipe = inputs
    _, *saved = output
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    ctx.recipe = recipe
    ctx.save_for_backward(x, topk_weights, w_up, w_down, *saved)


def _moe_fp8_grad(ctx, dy, *_unused):
    dx, d_weights, dw_up, dw_down = torch.ops.nmoe.moe_experts_fp8_backward(dy, *ctx.saved_tensors, *ctx.recipe)
    return dx, None, d_weights, dw_up, dw_down, None, None, None


moe_experts_fp8.register_autograd(_moe_fp8_grad, setup_context=_moe_fp8_setup)


# --------------------------------------------------------------------------------------- linear_cross_entropy


@torch.library.custom_op("nmoe::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, ignore_index: int, with_grads: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (mean cross-entropy of h @ weight^T, dL/dh (with_grads, else [0]), dL/dweight (same))."""
    on_triton = _dispatch.cross_entropy_on_triton(h, weight, targets)
    return _linear_ce.forward(h, weight, targets, chunk_size, ignore_index, with_grads, on_triton)


@linear_cross_entropy.register_fake
def _(h, weight, targets, chunk_size, ignore_index, with_grads):
    _dispatch.cross_entropy_on_triton(h, weight, targets)
    loss = h.new_empty((), dtype=torch.promote_types(h.dtype, torch.float32))
    if not with_grads:
        return loss, h.new_empty(0), weight.new_empty(0)
    return loss, h.new_empty(h.shape), weight.new_empty(weight.shape)


def _linear_ce_setup(ctx, inputs, output):
    _, dh, dw = output
    ctx.mark_non_differentiable(dh, dw)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    ctx.with_grads = inputs[5]
    ctx.save_for_backward(dh, dw)


def _linear_ce_grad(ctx, d_loss, _dh, _dw):
    if not ctx.with_grads:
        raise RuntimeError(
            "linear_cross_entropy ran with with_grads=False (grad mode off or no input requiring grad); "
            "call it with grad enabled to backpropagate"
        )
    dh, dw = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (
        (dh * d_loss).to(dh.dtype) if need_h else None,
        (dw * d_loss).to(dw.dtype) if need_w else None,
        None,
        None,
        None,
        None,
    )


linear_cross_entropy.register_autograd(_linear_ce_grad, setup_context=_linear_ce_setup)


# ------------------------------------------------------------------------------------------- FLOP formulas
# FlopCounterMode cannot see inside an op: count its GEMMs from shapes (every row, dropped slots included).


@register_flop_formula(torch.ops.nmoe.grouped_mm)
def _(x_shape, w_shape, offsets_shape, out_shape=None) -> int:
    return 2 * x_shape[0] * w_shape[1] * w_shape[2]


@register_flop_formula(torch.ops.nmoe.grouped_mm_backward)
def _(dy_shape, x_shape, w_shape, offsets_shape, need_dx, need_dw, out_shape=None) -> int:
    return 2 * x_shape[0] * w_shape[1] * w_shape[2] * (int(need_dx) + int(need_dw))


def _expert_flops(rows: int, w_up_shape) -> int:
    """up [rows,D]x[D,2H] + down [rows,H]x[H,D]."""
    _, d, h2 = w_up_shape
    return 2 * rows * d * h2 + 2 * rows * (h2 // 2) * d


@register_flop_formula(torch.ops.nmoe.expert_mlp)
def _(rows_shape, offsets_shape, w_up_shape, w_down_shape, out_shape=None) -> int:
    return _expert_flops(rows_shape[0], w_up_shape)


@register_flop_formula(torch.ops.nmoe.expert_mlp_backward)
def _(dy_shape, rows_shape, offsets_shape, w_up_shape, *_, out_shape=None) -> int:
    return 2 * _expert_flops(rows_shape[0], w_up_shape)


@register_flop_formula(torch.ops.nmoe.moe_experts)
def _(x_shape, ids_shape, weights_shape, w_up_shape, w_down_shape, out_shape=None) -> int:
    return _expert_flops(ids_shape[0] * ids_shape[1], w_up_shape)


@register_flop_formula(torch.ops.nmoe.moe_experts_backward)
def _(dy_shape, x_shape, weights_shape, w_up_shape, *_, out_shape=None) -> int:
    return 2 * _expert_flops(weights_shape[0] * weights_shape[1], w_up_shape)


@register_flop_formula(torch.ops.nmoe.moe_experts_fp8)
def _(x_shape, ids_shape, weights_shape, w_up_shape, w_down_shape, *_, out_shape=None) -> int:
    return _expert_flops(ids_shape[0] * ids_shape[1], w_up_shape)


@register_flop_formula(torch.ops.nmoe.moe_experts_fp8_backward)
def _(dy_shape, x_shape, weights_shape, w_up_shape, *_, out_shape=None) -> int:
    return 2 * _expert_flops(weights_shape[0] * weights_shape[1], w_up_shape)


@register_flop_formula(torch.ops.nmoe.linear_cross_entropy)
def _(h_shape, weight_shape, targets_shape, chunk_size, ignore_index, with_grads, out_shape=None) -> int:
    return 2 * h_shape[0] * h_shape[1] * weight_shape[0] * (3 if with_grads else 1)  # dh and dW in the forward
