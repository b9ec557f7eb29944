"""Launchers and autograd Functions over the Triton kernels (GPU path; CPU tensors under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch
import triton

from nmoe.kernels import _kernels as K
from nmoe.kernels.reference import ExpertSort

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    return triton.Config(dict(zip(names, (bm, bn, bk))), num_warps=warps, num_stages=stages)


_DW_NAMES = ("BLOCK_M", "BLOCK_KA", "BLOCK_N")
if INTERPRET:
    _GMM_CONFIGS = {(mode, wide): [_cfg(16, 16, 16, 4, 1)] for mode in (0, 1, 2) for wide in (False, True)}
    _DW_CONFIGS = {wide: [_cfg(16, 16, 16, 4, 1, _DW_NAMES)] for wide in (False, True)}
else:
    # bf16 tiles (measured on H100, bench/kernels.py); fp32 ("wide") halves BLOCK_K to fit shared memory
    _GMM_CONFIGS = {
        (K.EPILOGUE_STORE, False): [
            _cfg(128, 256, 64, 8, 3),
            _cfg(128, 256, 64, 8, 4),
            _cfg(256, 128, 64, 8, 3),
            _cfg(128, 128, 64, 8, 4),
            _cfg(128, 128, 64, 4, 4),
            _cfg(64, 128, 64, 4, 4),
        ],
        (K.EPILOGUE_SWIGLU, False): [
            _cfg(128, 128, 64, 8, 3),
            _cfg(128, 128, 64, 8, 4),
            _cfg(128, 64, 64, 8, 4),
            _cfg(128, 64, 64, 4, 4),
            _cfg(64, 128, 64, 4, 3),
        ],
        (K.EPILOGUE_SWIGLU_BWD, False): [
            _cfg(128, 128, 64, 8, 3),
            _cfg(128, 128, 64, 8, 4),
            _cfg(128, 64, 64, 4, 4),
            _cfg(64, 128, 64, 4, 4),
        ],
    }
    for mode in (0, 1, 2):
        _GMM_CONFIGS[(mode, True)] = [_cfg(128, 64, 32, 4, 3), _cfg(64, 64, 32, 4, 3)]
    _DW_CONFIGS = {
        False: [
            _cfg(64, 128, 128, 8, 3, _DW_NAMES),
            _cfg(64, 128, 128, 8, 4, _DW_NAMES),
            _cfg(128, 128, 128, 8, 3, _DW_NAMES),
            _cfg(64, 128, 256, 8, 3, _DW_NAMES),
            _cfg(64, 64, 128, 4, 4, _DW_NAMES),
        ],
        True: [_cfg(32, 128, 64, 4, 3, _DW_NAMES), _cfg(32, 64, 64, 4, 3, _DW_NAMES)],
    }

_GMM = {
    key: triton.autotune(
        configs, key=["N", "K", "E", "GATHER_A"], restore_value=["dw_ptr"] if key[0] == K.EPILOGUE_SWIGLU_BWD else []
    )(K.gmm_kernel)
    for key, configs in _GMM_CONFIGS.items()
}
_GMM_DW = {
    wide: triton.autotune(configs, key=["KA", "N", "E", "GATHER_A", "GATHER_B", "SCALE_B"])(K.gmm_dw_kernel)
    for wide, configs in _DW_CONFIGS.items()
}


def _launch_gmm(
    a, b, b_strides, offsets, out, n, k, *, a_idx=None, mode=K.EPILOGUE_STORE, h=None, w=None, w_idx=None, dw=None
):
    """Grouped product into `out` (rows in expert order); b_strides = (expert, reduction, output column)."""
    m, n_experts = out.shape[0], offsets.shape[0]
    if m == 0 or n == 0:
        return out

    def grid(meta):
        return ((triton.cdiv(m, meta["BLOCK_M"]) + n_experts + 1) * triton.cdiv(n, meta["BLOCK_N"]),)

    dummy = offsets
    _GMM[(mode, a.element_size() > 2)][grid](
        a,
        dummy if a_idx is None else a_idx,
        b,
        out,
        dummy if h is None else h,
        dummy if w is None else w,
        dummy if w_idx is None else w_idx,
        dummy if dw is None else dw,
        offsets,
        m,
        n,
        k,
        n_experts,
        a.stride(0),
        a.stride(1),
        *b_strides,
        out.stride(0),
        0 if h is None else h.stride(0),
        GATHER_A=a_idx is not None,
        EPILOGUE=mode,
        UPCAST=INTERPRET,
        BLOCK_E=triton.next_power_of_2(n_experts),
    )
    return out


def _launch_dw(a, b, offsets, out, *, a_idx=None, b_idx=None, scale=None, scale_idx=None):
    """out[e] = a[rows of e]^T @ (scale * b[rows of e]) for every expert e (zero for empty groups)."""
    n_experts, ka, n = out.shape

    def grid(meta):
        return (n_experts * triton.cdiv(ka, meta["BLOCK_KA"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    dummy = offsets
    _GMM_DW[a.element_size() > 2][grid](
        a,
        dummy if a_idx is None else a_idx,
        b,
        dummy if b_idx is None else b_idx,
        dummy if scale is None else scale,
        dummy if scale_idx is None else scale_idx,
        out,
        offsets,
        ka,
        n,
        n_experts,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        GATHER_A=a_idx is not None,
        GATHER_B=b_idx is not None,
        SCALE_B=scale is not None,
        UPCAST=INTERPRET,
    )
    return out


def _weight_strides(w: torch.Tensor, transpose: bool) -> tuple[int, int, int]:
    return (w.stride(0), w.stride(2), w.stride(1)) if transpose else (w.stride(0), w.stride(1), w.stride(2))


def gmm_forward(x, w, offsets):
    """x[M,K] @ w[e][K,N] per group -> [M,N] (rows past offsets[-1] zero)."""
    out = torch.empty(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    return _launch_gmm(x, w, _weight_strides(w, False), offsets, out, w.shape[2], w.shape[1])


def gmm_dx(dy, w, offsets):
    """dy[M,N] @ w[e]^T per group -> dx[M,K]."""
    out = torch.empty(dy.shape[0], w.shape[1], dtype=dy.dtype, device=dy.device)
    return _launch_gmm(dy, w, _weight_strides(w, True), offsets, out, w.shape[1], w.shape[2])


def gmm_dw(x, dy, offsets, n_experts):
    """x[rows of e]^T @ dy[rows of e] -> dw[E,K,N]."""
    out = torch.empty(n_experts, x.shape[1], dy.shape[1], dtype=x.dtype, device=x.device)
    return _launch_dw(x, dy, offsets, out)


class GroupedMM(torch.autograd.Function):
    """grouped_mm with Triton forward, dX (grouped, transposed w) and per-expert dW kernels."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        """x[M,K], w[E,K,N], offsets[E] int32 -> [M,N] (x.dtype)."""
        ctx.save_for_backward(x, w, offsets)
        return gmm_forward(x, w, offsets)

    @staticmethod
    def backward(ctx, dy):
        """dy[M,N] -> (dx[M,K], dw[E,K,N], None)."""
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = gmm_dx(dy, w, offsets) if ctx.needs_input_grad[0] else None
        dw = gmm_dw(x, dy, offsets, w.shape[0]) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _sort_block(n_experts: int) -> int:
    return max(32, min(128, 8192 // triton.next_power_of_2(n_experts)))


def route(topk_ids: torch.Tensor, n_experts: int):
    """-> (ExpertSort, token[T*K] int32 of each grouped row, pos[T*K] int32 grouped row of each slot)."""
    ids = topk_ids.reshape(-1).to(torch.int32)
    n, dev = ids.shape[0], ids.device
    order = torch.empty(n, dtype=torch.int64, device=dev)
    token = torch.empty(n, dtype=torch.int32, device=dev)
    pos = torch.empty(n, dtype=torch.int32, device=dev)
    if n == 0:
        zeros = torch.zeros(n_experts, dtype=torch.int32, device=dev)
        return ExpertSort(zeros, zeros.clone(), order), token, pos
    block = _sort_block(n_experts)
    n_blocks = triton.cdiv(n, block)
    hist = torch.empty(n_blocks, n_experts, dtype=torch.int32, device=dev)
    K.expert_histogram_kernel[(n_blocks,)](
        ids, hist, n, n_experts, BLOCK=block, BLOCK_E=triton.next_power_of_2(n_experts)
    )
    cum = hist.cumsum(0, dtype=torch.int32)
    counts = cum[-1]
    offsets = counts.cumsum(0, dtype=torch.int32)
    base = cum - hist + (offsets - counts)[None, :]
    K.expert_scatter_kernel[(n_blocks,)](
        ids, base, order, token, pos, n, n_experts, TOP_K=topk_ids.shape[1], BLOCK=block
    )
    return ExpertSort(counts.contiguous(), offsets, order), token, pos


def combine(src, pos, weights, n_tokens, top_k):
    """out[t] = sum_k weights[t,k] * src[pos[t*K+k]] (unweighted when weights is None) -> [T,D]."""
    d = src.shape[1]
    out = torch.empty(n_tokens, d, dtype=src.dtype, device=src.device)
    if n_tokens == 0:
        return out
    block_t, block_d = 16, min(256, triton.next_power_of_2(d))
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(d, block_d))
    K.combine_kernel[grid](
        src,
        pos,
        pos if weights is None else weights,
        out,
        n_tokens,
        d,
        src.stride(0),
        out.stride(0),
        TOP_K=top_k,
        WEIGHTED=weights is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


class MoEExperts(torch.autograd.Function):
    """Routed SwiGLU experts: gather -> up+SwiGLU -> down -> weighted combine, fused backward."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down):
        """x[T,D], topk_ids[T,K], topk_weights[T,K] float, w_up[E,D,2H], w_down[E,H,D] -> y[T,D] (x.dtype)."""
        n_tokens, top_k = topk_ids.shape
        n_experts, d, h2 = w_up.shape
        hdim = h2 // 2
        routing, token, pos = route(topk_ids, n_experts)
        rows = token.shape[0]
        weights = topk_weights.reshape(-1)
        pre = torch.empty(rows, h2, dtype=x.dtype, device=x.device)
        act = torch.empty(rows, hdim, dtype=x.dtype, device=x.device)
        _launch_gmm(
            x,
            w_up,
            _weight_strides(w_up, False),
            routing.offsets,
            act,
            hdim,
            d,
            a_idx=token,
            mode=K.EPILOGUE_SWIGLU,
            h=pre,
        )
        out = torch.empty(rows, d, dtype=x.dtype, device=x.device)
        _launch_gmm(act, w_down, _weight_strides(w_down, False), routing.offsets, out, d, hdim)
        y = combine(out, pos, weights, n_tokens, top_k)
        ctx.save_for_backward(x, weights, w_up, w_down, routing.offsets, routing.order, token, pos, pre, act)
        ctx.weights_dtype = topk_weights.dtype
        ctx.top_k = top_k
        return y

    @staticmethod
    def backward(ctx, dy):
        """dy[T,D] -> (dx[T,D], None, d_topk_weights[T,K] (weights' dtype), dw_up, dw_down)."""
        x, weights, w_up, w_down, offsets, order, token, pos, pre, act = ctx.saved_tensors
        dy = dy.contiguous()
        n_tokens, d = x.shape
        rows, hdim = act.shape
        d_pre = torch.empty(rows, 2 * hdim, dtype=x.dtype, device=x.device)
        d_weights = torch.zeros(rows, dtype=torch.float32, device=x.device)
        _launch_gmm(
            dy,
            w_down,
            _weight_strides(w_down, True),
            offsets,
            d_pre,
            hdim,
            d,
            a_idx=token,
            mode=K.EPILOGUE_SWIGLU_BWD,
            h=pre,
            w=weights,
            w_idx=order,
            dw=d_weights,
        )
        dw_down = torch.empty(w_down.shape, dtype=w_down.dtype, device=x.device)
        _launch_dw(act, dy, offsets, dw_down, b_idx=token, scale=weights, scale_idx=order)
        dw_up = torch.empty(w_up.shape, dtype=w_up.dtype, device=x.device)
        _launch_dw(x, d_pre, offsets, dw_up, a_idx=token)
        d_rows = torch.empty(rows, d, dtype=x.dtype, device=x.device)
        _launch_gmm(d_pre, w_up, _weight_strides(w_up, True), offsets, d_rows, d, 2 * hdim)
        dx = combine(d_rows, pos, None, n_tokens, ctx.top_k)
        d_topk = d_weights.view(n_tokens, ctx.top_k).to(ctx.weights_dtype)
        return dx, None, d_topk, dw_up, dw_down
