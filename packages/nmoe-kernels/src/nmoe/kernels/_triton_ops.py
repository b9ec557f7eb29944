"""Launchers and autograd Functions over the Triton kernels (GPU path; CPU tensors under TRITON_INTERPRET=1)."""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from nmoe.kernels import _kernels as K
from nmoe.kernels import _lowprec_kernels as LK
from nmoe.kernels.reference import ExpertSort

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    return triton.Config(dict(zip(names, (bm, bn, bk))), num_warps=warps, num_stages=stages)


_DW_NAMES = ("BLOCK_M", "BLOCK_KA", "BLOCK_N")
if INTERPRET:
    _GMM_CONFIGS = {(mode, wide): [_cfg(16, 16, 16, 4, 1)] for mode in (0, 1) for wide in (False, True)}
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
    }
    for mode in (0, 1):
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


def _set_tma_blocks(nargs) -> None:
    """Autotune pre-hook: give the TMA descriptors of a launch the block shapes of the config being run."""
    if isinstance(nargs["a_ptr"], TensorDescriptor):
        nargs["a_ptr"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    if isinstance(nargs["b_ptr"], TensorDescriptor):
        bk, bn = nargs["BLOCK_K"], nargs["BLOCK_N"]
        nargs["b_ptr"].block_shape = [1, bn, bk] if nargs["TRANS_B"] else [1, bk, bn]


def _set_tma_blocks_dw(nargs) -> None:
    if isinstance(nargs["a_ptr"], TensorDescriptor):
        nargs["a_ptr"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_KA"]]
    if isinstance(nargs["b_ptr"], TensorDescriptor):
        nargs["b_ptr"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]


def _with_hook(configs, hook):
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=hook) for c in configs]


if INTERPRET:
    _GMM_TMA_CONFIGS = _GMM_CONFIGS
    _DW_TMA_CONFIGS = _DW_CONFIGS
else:
    # TMA variants (bf16 tiles; fp32 "wide" halves BLOCK_K): deeper pipelines than the pointer kernels
    _GMM_TMA_CONFIGS = {
        (K.EPILOGUE_STORE, False): [
            _cfg(128, 256, 64, 8, 3),
            _cfg(128, 256, 64, 8, 4),
            _cfg(128, 128, 64, 8, 4),
            _cfg(128, 128, 64, 4, 5),
            _cfg(64, 128, 64, 4, 5),
        ],
        (K.EPILOGUE_SWIGLU, False): [
            _cfg(128, 128, 64, 8, 3),
            _cfg(128, 128, 64, 8, 4),
            _cfg(128, 64, 64, 4, 5),
            _cfg(64, 128, 64, 4, 4),
        ],
    }
    for mode in (0, 1):
        _GMM_TMA_CONFIGS[(mode, True)] = [_cfg(128, 64, 32, 4, 4), _cfg(64, 64, 32, 4, 4)]
    _DW_TMA_CONFIGS = {
        False: [
            _cfg(64, 128, 128, 8, 3, _DW_NAMES),
            _cfg(64, 128, 128, 8, 4, _DW_NAMES),
            _cfg(128, 128, 128, 8, 3, _DW_NAMES),
            _cfg(64, 128, 256, 8, 3, _DW_NAMES),
        ],
        True: [_cfg(32, 128, 64, 4, 3, _DW_NAMES), _cfg(32, 64, 64, 4, 3, _DW_NAMES)],
    }


def _gmm_autotuner(configs):
    return triton.autotune(configs, key=["N", "K", "E", "GATHER_A", "TRANS_B"])(K.gmm_kernel)


def _dw_autotuner(configs):
    return triton.autotune(configs, key=["KA", "N", "E"])(K.gmm_dw_kernel)


# (epilogue, fp32) -> autotuned kernel; one autotuner per variant so that their tuning caches stay apart
_GMM = {key: _gmm_autotuner(configs) for key, configs in _GMM_CONFIGS.items()}
_GMM_TMA = {key: _gmm_autotuner(_with_hook(c, _set_tma_blocks)) for key, c in _GMM_TMA_CONFIGS.items()}
_GMM_DW = {wide: _dw_autotuner(configs) for wide, configs in _DW_CONFIGS.items()}
_GMM_DW_TMA = {wide: _dw_autotuner(_with_hook(c, _set_tma_blocks_dw)) for wide, c in _DW_TMA_CONFIGS.items()}

GEMM_VARIANTS = ("pointer", "tma")


# "pointer": masked pointer loads (the measured default); "tma": operands that are not row-gathered come in
# through TMA tensor descriptors (Hopper+). Tests and benchmarks switch it with `use_gemm_variant`.
def env_choice(env: str, choices: tuple[str, ...], default: str) -> str:
    """The process-wide kernel choice named by environment variable env (default when unset), checked."""
    value = os.environ.get(env, default)
    if value not in choices:
        raise ValueError(f"{env}={value!r}: expected one of {choices}")
    return value


@contextlib.contextmanager
def switched(module, attr: str, choices: tuple[str, ...], what: str, name: str):
    """Set the kernel choice module.attr to name (one of choices) for the block."""
    if name not in choices:
        raise ValueError(f"unknown {what} {name!r}; expected one of {choices}")
    previous = getattr(module, attr)
    setattr(module, attr, name)
    try:
        yield
    finally:
        setattr(module, attr, previous)


_gemm_variant = env_choice("NMOE_KERNELS_GEMM", GEMM_VARIANTS, "pointer")


def use_gemm_variant(name: str):
    """Run the grouped GEMMs of this block with the given variant ("pointer" or "tma")."""
    return switched(sys.modules[__name__], "_gemm_variant", GEMM_VARIANTS, "grouped GEMM variant", name)


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, unit last stride and 16-byte aligned other strides."""
    size = t.element_size()
    return (
        t.numel() > 0
        and t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(st * size % 16 == 0 for st in t.stride()[:-1])
    )


def _descriptor(t: torch.Tensor) -> TensorDescriptor:
    """Descriptor over all of t; the autotune pre-hook sets the block shape of the config being run."""
    return TensorDescriptor.from_tensor(t, [1] * (t.dim() - 2) + [16, 16])


def _launch_gmm(a, w, offsets, out, *, transpose=False, a_idx=None, mode=K.EPILOGUE_STORE, h=None):
    """Grouped product into `out` (rows in expert order): out[rows of e] = a[rows] @ (w[e]^T if transpose else w[e]).

    a_idx gathers the rows of a; mode picks the epilogue (see `_kernels.gmm_kernel`); h receives the SwiGLU's
    pre-activations.
    """
    m, n_experts = out.shape[0], offsets.shape[0]
    n = w.shape[1] if transpose else w.shape[2]
    if mode == K.EPILOGUE_SWIGLU:
        n //= 2
    k = w.shape[2] if transpose else w.shape[1]
    if m == 0 or n == 0:
        return out

    def grid(meta):
        return ((triton.cdiv(m, meta["BLOCK_M"]) + n_experts + 1) * triton.cdiv(n, meta["BLOCK_N"]),)

    strides = (w.stride(0), w.stride(2), w.stride(1)) if transpose else (w.stride(0), w.stride(1), w.stride(2))
    wide = a.element_size() > 2
    a_tma = _gemm_variant == "tma" and a_idx is None and _tma_ok(a)
    b_tma = _gemm_variant == "tma" and _tma_ok(w)
    kernel = (_GMM_TMA if a_tma or b_tma else _GMM)[(mode, wide)]
    dummy = offsets
    kernel[grid](
        _descriptor(a) if a_tma else a,
        dummy if a_idx is None else a_idx,
        _descriptor(w) if b_tma else w,
        out,
        dummy if h is None else h,
        offsets,
        m,
        n,
        k,
        n_experts,
        a.stride(0),
        a.stride(1),
        *strides,
        out.stride(0),
        0 if h is None else h.stride(0),
        GATHER_A=a_idx is not None,
        EPILOGUE=mode,
        UPCAST=INTERPRET,
        BLOCK_E=triton.next_power_of_2(n_experts),
        A_TMA=a_tma,
        B_TMA=b_tma,
        TRANS_B=transpose,
    )
    return out


def _launch_dw(a, b, offsets, out):
    """out[e] = a[rows of e]^T @ b[rows of e] for every expert e (zero for empty groups)."""
    n_experts, ka, n = out.shape

    def grid(meta):
        return (n_experts * triton.cdiv(ka, meta["BLOCK_KA"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    a_tma = _gemm_variant == "tma" and _tma_ok(a)
    b_tma = _gemm_variant == "tma" and _tma_ok(b)
    kernel = (_GMM_DW_TMA if a_tma or b_tma else _GMM_DW)[a.element_size() > 2]
    kernel[grid](
        _descriptor(a) if a_tma else a,
        _descriptor(b) if b_tma else b,
        a,
        b,
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
        UPCAST=INTERPRET,
        A_TMA=a_tma,
        B_TMA=b_tma,
    )
    return out


def gmm_forward(x, w, offsets):
    """x[M,K] @ w[e][K,N] per group -> [M,N] (rows past offsets[-1] zero)."""
    out = torch.empty(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    return _launch_gmm(x, w, offsets, out)


def gmm_backward(dy, x, w, offsets, need_dx: bool, need_dw: bool):
    """dy[M,N] -> (dx[M,K] = dy @ w[e]^T per group, dw[E,K,N] = x[rows of e]^T @ dy[rows of e]); empty [0] if not needed."""
    dy = dy.contiguous()
    dx = dy.new_empty(0)
    dw = dy.new_empty(0)
    if need_dx:
        dx = _launch_gmm(
            dy, w, offsets, torch.empty(dy.shape[0], w.shape[1], dtype=dy.dtype, device=dy.device), transpose=True
        )
    if need_dw:
        dw = _launch_dw(x, dy, offsets, torch.empty(w.shape, dtype=x.dtype, device=x.device))
    return dx, dw


def _sort_block(n_bins: int) -> int:
    return max(32, min(128, 8192 // triton.next_power_of_2(n_bins)))


def route(topk_ids: torch.Tensor, n_experts: int):
    """-> (ExpertSort, token[T*K] int32 of each grouped row, pos[T*K] int32 grouped row of each slot).

    Slots with a negative id (dropped) go to a trailing bin after the last expert: rows [offsets[-1], T*K).
    """
    ids = topk_ids.reshape(-1).to(torch.int32)
    n, dev = ids.shape[0], ids.device
    order = torch.empty(n, dtype=torch.int64, device=dev)
    token = torch.empty(n, dtype=torch.int32, device=dev)
    pos = torch.empty(n, dtype=torch.int32, device=dev)
    if n == 0:
        zeros = torch.zeros(n_experts, dtype=torch.int32, device=dev)
        return ExpertSort(zeros, zeros.clone(), order), token, pos
    n_bins = n_experts + 1
    block = _sort_block(n_bins)
    n_blocks = triton.cdiv(n, block)
    hist = torch.empty(n_blocks, n_bins, dtype=torch.int32, device=dev)
    K.expert_histogram_kernel[(n_blocks,)](ids, hist, n, n_experts, BLOCK=block, BLOCK_E=triton.next_power_of_2(n_bins))
    # scan each bin over the blocks along the innermost dim: torch's outer-dim scan of [blocks, bins] ran one thread
    # per bin (0.27 ms for moonlet's 1,536 x 65, bench/RESULTS.md)
    cum = hist.t().contiguous().cumsum(1, dtype=torch.int32).t()
    counts = cum[-1]
    ends = counts.cumsum(0, dtype=torch.int32)
    base = (cum - hist + (ends - counts)[None, :]).contiguous()
    K.expert_scatter_kernel[(n_blocks,)](
        ids, base, order, token, pos, n, n_experts, TOP_K=topk_ids.shape[1], BLOCK=block
    )
    return ExpertSort(counts[:n_experts].contiguous(), ends[:n_experts].contiguous(), order), token, pos


def combine(src, pos, weights, offsets, n_tokens, top_k):
    """out[t] = sum_k weights[t,k] * src[pos[t*K+k]] (unweighted when weights is None) over the kept slots
    (row < offsets[-1]) -> [T,D]."""
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
        offsets[-1:],
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


def gather_rows(src, idx, scale=None, scale_idx=None):
    """src[idx[r]] for each r -> [R, D] in src's dtype, times scale[scale_idx[r]] (in fp32, rounded to src's dtype)
    when given. The dW GEMMs read gathered operands this way: gathering inside the dW kernel (no TMA) ran 0.6 ms
    slower over moonlet's two dW than this copy plus the plain kernel (bench/RESULTS.md)."""
    rows, d = idx.shape[0], src.shape[1]
    out = torch.empty(rows, d, dtype=src.dtype, device=src.device)
    if rows and d:
        block_d = min(triton.next_power_of_2(d), 1024)
        block_r = max(1, 4096 // block_d)
        K.gather_rows_kernel[(triton.cdiv(rows, block_r), triton.cdiv(d, block_d))](
            src,
            idx,
            idx if scale is None else scale,
            idx if scale_idx is None else scale_idx,
            out,
            rows,
            d,
            src.stride(0),
            out.stride(0),
            SCALE=scale is not None,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
        )
    return out


def pow2_parts(n: int, max_parts: int = 4, smallest: int = 16) -> tuple[int, ...]:
    """n as up to max_parts descending powers of two, zero-padded to max_parts (the last part rounds the remainder up,
    at least `smallest`): register tiles without masked lanes for widths such as 704 = 512 + 128 + 64."""
    parts: list[int] = []
    rest = n
    while rest >= smallest and len(parts) < max_parts - 1:
        parts.append(1 << (rest.bit_length() - 1))
        rest -= parts[-1]
    if rest > 0 or not parts:
        parts.append(max(triton.next_power_of_2(rest), smallest))
    return tuple(parts) + (0,) * (max_parts - len(parts))


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


# float32 d_pre values per program of swiglu_backward_rows (whole rows: 4 moonlet rows of 2 x 704)
SWIGLU_BWD_ELEMENTS = 4096 if INTERPRET else 8192
SWIGLU_BWD_WARPS = 4  # 8192 values over 4 warps: the fastest of 4096-16384 x 4-8 warps for bf16 and fp8 (H100)


def swiglu_backward_rows(
    d_act, pre, offsets, weights=None, w_idx=None, d_weights=None, quantize=False, fold=None, store=True
):
    """d_act[M,H] float32 or pre's dtype (dL/d act; before the routing weights[w_idx[r]] when given), pre[M,2H] -> d_pre[M,2H] in
    pre's dtype, or with quantize (d_pre, its e4m3 rows [M,2H], float32 row scales [M]); with weights,
    d_weights[w_idx[r]] = <d_act[r], act[r]>. Rows past offsets[-1] (dropped slots) get zeros and no gradient.
    fold (with quantize): float32 [E,2H] column scales of each row's expert multiplied in before quantising.
    store=False (with quantize): d_pre is not written and comes back as None."""
    if fold is not None and (not quantize or fold.stride(1) != 1):
        raise ValueError("swiglu_backward_rows: fold needs quantize and column scales with unit column stride")
    if not (store or quantize):
        raise ValueError("swiglu_backward_rows: store=False needs quantize (else it computes nothing)")
    m, h = d_act.shape
    dev = pre.device
    d_pre = torch.empty(m, 2 * h, dtype=pre.dtype, device=dev) if store else pre  # pre: a dtype carrier only
    q = torch.empty(m, 2 * h if quantize else 0, dtype=torch.float8_e4m3fn, device=dev)
    s = torch.empty(m if quantize else 0, dtype=torch.float32, device=dev)
    n_experts = offsets.shape[0]
    if m and h and n_experts:
        block_c, *parts = pow2_parts(h)
        block_m = _prev_power_of_2(SWIGLU_BWD_ELEMENTS // (2 * (block_c + sum(parts))))
        weighted = weights is not None
        LK.swiglu_bwd_rows_kernel[(triton.cdiv(m, block_m),)](
            d_act,
            pre,
            d_pre,
            q if quantize else d_pre,
            s if quantize else d_act,
            weights if weighted else d_act,
            w_idx if weighted else offsets,
            d_weights if weighted else d_act,
            offsets,
            d_act if fold is None else fold,
            m,
            h,
            n_experts,
            d_act.stride(0),
            pre.stride(0),
            d_pre.stride(0),
            q.stride(0) if quantize else 0,
            0 if fold is None else fold.stride(0),
            FOLD=fold is not None,
            BLOCK_E=triton.next_power_of_2(n_experts) if fold is not None else 1,
            WEIGHTED=weighted,
            QUANTIZE=quantize,
            STORE=store,
            BLOCK_M=block_m,
            BLOCK_C=block_c,
            PART1=parts[0],
            PART2=parts[1],
            PART3=parts[2],
            num_warps=SWIGLU_BWD_WARPS,
            **({} if INTERPRET else {"enable_fp_fusion": False}),
        )
    d_pre = d_pre if store else None
    return (d_pre, q, s) if quantize else d_pre


def _swiglu_up(a, w_up, offsets, a_idx=None):
    """(pre[R,2H] = a[rows] @ w_up[e], act[R,H] = silu(gate) * up) per group; R = len(a_idx) or a.shape[0]."""
    rows = a.shape[0] if a_idx is None else a_idx.shape[0]
    pre = torch.empty(rows, w_up.shape[2], dtype=a.dtype, device=a.device)
    act = torch.empty(rows, w_up.shape[2] // 2, dtype=a.dtype, device=a.device)
    _launch_gmm(a, w_up, offsets, act, a_idx=a_idx, mode=K.EPILOGUE_SWIGLU, h=pre)
    return pre, act


def expert_mlp_forward(rows, offsets, w_up, w_down):
    """rows[M,D] grouped by expert -> (y[M,D], pre[M,2H], act[M,H]); rows past offsets[-1] give 0."""
    pre, act = _swiglu_up(rows, w_up, offsets)
    return gmm_forward(act, w_down, offsets), pre, act


def _d_act(dy, w_down, offsets, pre, token=None):
    """dL/d act[R,H] float32 = dy[rows] @ w_down[e]^T per group (rows gathered by token), the plain dgrad GEMM:
    the SwiGLU backward runs after it on whole rows (swiglu_backward_rows), faster than in its epilogue."""
    d_act = torch.empty(pre.shape[0], pre.shape[1] // 2, dtype=torch.float32, device=dy.device)
    return _launch_gmm(dy, w_down, offsets, d_act, transpose=True, a_idx=token)


def expert_mlp_backward(dy, rows, offsets, w_up, w_down, pre, act):
    """dy[M,D] -> (d_rows[M,D], dw_up[E,D,2H], dw_down[E,H,D])."""
    dy = dy.contiguous()
    d_pre = swiglu_backward_rows(_d_act(dy, w_down, offsets, pre), pre, offsets)
    dw_down = _launch_dw(act, dy, offsets, torch.empty(w_down.shape, dtype=w_down.dtype, device=dy.device))
    dw_up = _launch_dw(rows, d_pre, offsets, torch.empty(w_up.shape, dtype=w_up.dtype, device=dy.device))
    d_rows = _launch_gmm(
        d_pre, w_up, offsets, torch.empty(rows.shape, dtype=rows.dtype, device=rows.device), transpose=True
    )
    return d_rows, dw_up, dw_down


def moe_forward(x, topk_ids, topk_weights, w_up, w_down):
    """Routed SwiGLU experts: gather -> up+SwiGLU -> down -> weighted combine.

    -> (y[T,D], pre[R,2H], act[R,H], offsets[E], order[R], token[R], pos[R]) with R = T*K (saved for backward).
    """
    n_tokens, top_k = topk_ids.shape
    routing, token, pos = route(topk_ids, w_up.shape[0])
    pre, act = _swiglu_up(x, w_up, routing.offsets, a_idx=token)
    out = gmm_forward(act, w_down, routing.offsets)
    y = combine(out, pos, topk_weights.reshape(-1), routing.offsets, n_tokens, top_k)
    return y, pre, act, routing.offsets, routing.order, token, pos


def moe_backward(dy, x, topk_weights, w_up, w_down, offsets, order, token, pos, pre, act, dw_dtype=None):
    """dy[T,D] -> (dx[T,D], d_topk_weights[T,K] (weights' dtype), dw_up, dw_down in dw_dtype (default the
    weights')); fused as in the forward."""
    dy = dy.contiguous()
    n_tokens, top_k = topk_weights.shape
    weights = topk_weights.reshape(-1)
    d_weights = torch.zeros(pre.shape[0], dtype=torch.float32, device=x.device)
    d_pre = swiglu_backward_rows(_d_act(dy, w_down, offsets, pre, token), pre, offsets, weights, order, d_weights)
    dw_down = torch.empty(w_down.shape, dtype=dw_dtype or w_down.dtype, device=x.device)
    _launch_dw(act, gather_rows(dy, token, weights, order), offsets, dw_down)
    dw_up = torch.empty(w_up.shape, dtype=dw_dtype or w_up.dtype, device=x.device)
    _launch_dw(gather_rows(x, token), d_pre, offsets, dw_up)
    d_rows = _launch_gmm(
        d_pre, w_up, offsets, torch.empty(pre.shape[0], x.shape[1], dtype=x.dtype, device=x.device), transpose=True
    )
    dx = combine(d_rows, pos, None, offsets, n_tokens, top_k)
    return dx, d_weights.view(n_tokens, top_k).to(topk_weights.dtype), dw_up, dw_down


def cross_entropy_rows(logits, targets, loss_out, scale, ignore_index: int, with_grad: bool) -> None:
    """loss_out[r] = CE of logits row r (0 if ignored); with_grad: logits <- scale[0] * (softmax - onehot) in place."""
    n, v = logits.shape
    if n == 0:
        return
    block_v = 16 if INTERPRET else min(4096, triton.next_power_of_2(v))
    K.cross_entropy_rows_kernel[(n,)](
        logits,
        targets,
        loss_out,
        scale,
        v,
        logits.stride(0),
        ignore_index,
        WITH_GRAD=with_grad,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
