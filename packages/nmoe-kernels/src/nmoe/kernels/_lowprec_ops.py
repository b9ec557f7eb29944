"""Launchers and autograd Functions over the low-precision Triton kernels (GPU; CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import NamedTuple

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from nmoe.kernels import _lowprec_kernels as K
from nmoe.kernels import _quack_gemm, _triton_ops
from nmoe.kernels import reference_lowprec as R
from nmoe.kernels._triton_ops import _prev_power_of_2, pow2_parts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FP8 = torch.float8_e4m3fn
BLOCK = R.FP8_BLOCK
# bit-exact kernels: no FMA contraction (the interpreter rounds every op anyway and takes no such option)
EXACT = {} if INTERPRET else {"enable_fp_fusion": False}


def _cfg(names, values, warps, stages):
    return triton.Config(dict(zip(names, values)), num_warps=warps, num_stages=stages)


_GMM_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_DW_NAMES = ("BLOCK_M", "BLOCK_KA", "BLOCK_N")
if INTERPRET:
    # the interpreter's cost is per op, not per element: few, large tiles (still several per test shape)
    _GMM_CONFIGS = {
        K.EPILOGUE_STORE: [_cfg(_GMM_NAMES, (64, 64, 64), 4, 1)],
        K.EPILOGUE_SWIGLU_QUANT: [_cfg(_GMM_NAMES, (64, BLOCK, 64), 4, 1)],
        K.EPILOGUE_SWIGLU_BWD: [_cfg(_GMM_NAMES, (64, 64, 64), 4, 1)],
        K.EPILOGUE_SWIGLU_STORE: [_cfg(_GMM_NAMES, (64, 64, 64), 4, 1)],
    }
    _DW_CONFIGS = [_cfg(_DW_NAMES, (64, 64, 64), 4, 1)]
    QUANT_ROWS, QUANT_COLS, NVFP4_BLOCKS = 64, 64, 64
else:
    # fp8 wgmma tiles for H100: BLOCK_K divides 128 (blockwise scales); every config here compiles for sm_90
    # without register spills (tests/compile_lowprec.py); the autotuner picks among them by measured time
    _GMM_CONFIGS = {
        K.EPILOGUE_STORE: [
            _cfg(_GMM_NAMES, (128, 128, 128), 8, 3),
            _cfg(_GMM_NAMES, (128, 128, 128), 8, 4),
            _cfg(_GMM_NAMES, (64, 256, 128), 8, 3),
            _cfg(_GMM_NAMES, (128, 128, 64), 8, 4),
            _cfg(_GMM_NAMES, (128, 256, 128), 8, 3),
            _cfg(_GMM_NAMES, (128, 128, 128), 4, 4),
            # K = 704 (moonlet's down projection) is 11 whole 64-column steps
            _cfg(_GMM_NAMES, (128, 256, 64), 8, 4),
            _cfg(_GMM_NAMES, (256, 128, 64), 8, 4),
        ],
        K.EPILOGUE_SWIGLU_QUANT: [  # BLOCK_N is the 128-column quantisation block of the activation
            _cfg(_GMM_NAMES, (64, BLOCK, 128), 8, 3),
            _cfg(_GMM_NAMES, (64, BLOCK, 64), 8, 4),
        ],
        K.EPILOGUE_SWIGLU_BWD: [
            _cfg(_GMM_NAMES, (64, 128, 128), 8, 3),
            _cfg(_GMM_NAMES, (64, 128, 128), 8, 4),
            _cfg(_GMM_NAMES, (64, 128, 64), 8, 4),
            _cfg(_GMM_NAMES, (128, 64, 128), 8, 3),  # 128 x 128 spills the epilogue's three tiles
        ],
        K.EPILOGUE_SWIGLU_STORE: [  # two accumulators (gate, up) per tile
            _cfg(_GMM_NAMES, (64, 128, 128), 8, 3),
            _cfg(_GMM_NAMES, (64, 128, 128), 8, 4),
            _cfg(_GMM_NAMES, (128, 64, 128), 8, 3),
        ],
    }
    _DW_CONFIGS = [
        _cfg(_DW_NAMES, (128, 128, 128), 8, 3),
        _cfg(_DW_NAMES, (64, 128, 128), 8, 3),
        _cfg(_DW_NAMES, (128, 128, 64), 8, 3),
    ]
    QUANT_ROWS, QUANT_COLS, NVFP4_BLOCKS = 32, 64, 64
# the fused AdamW's 16-blocks and warps per program: the fastest of 32-256 blocks x 4-8 warps on an H100
# (bench/lowprec.py --adamw-configs, bench/RESULTS.md)
# one-pass rowwise quantisers: float32 values per program (whole rows, in power-of-two parts; 8192 was the fastest
# of 1-8k over moonlet's 704-, 1,024- and 1,408-wide rows together, fp8_profile --sweep) and per weight column slab
# (wide enough for coalesced loads of a [K, columns] slab)
ONE_PASS_ELEMENTS = 4096 if INTERPRET else 8192
# w_up's slab (1,024 x 32 float32, 8 warps): 0.208 ms against 0.244 at 16,384 values (H100 2026-11-25)
ONE_PASS_SLAB = 4096 if INTERPRET else 32768
# warps per program of the one-pass weight slab quantiser. Not 4: w_up's two-layout pass then wrote wrong codes on the
# H100 (Triton 3.6; so did every launch at 65,536 values); 8 and 16 were bit-exact, equally fast
WEIGHT_WARPS = 8
# rows folded with a weight's scales hold a second [rows, C] tile (the scales): fewer rows per program (measured:
# act 704 wide, 0.094 ms at 4096 values against 0.116 at 8192; as SwiGLU of gate|up, 0.132 ms at 4 rows against
# 0.171 at 2, the fastest of 1-16 rows x 2-8 warps, H100 2026-11-25)
ONE_PASS_ELEMENTS_FOLD = 2048 if INTERPRET else 4096
ROW_WARPS = 4  # warps per program of the row quantiser
# the dW column quantiser's columns per 128-row program and warps (fastest of 32-256 x 4-8 on moonlet's dy and x
# together, H100 probe 2026-11-25)
DW_COLS_BLOCK, DW_COLS_WARPS = (32, 4) if INTERPRET else (128, 4)
TRANSPOSE_BLOCK = 32 if INTERPRET else 128  # codes per side of a transposed weight tile (fastest of 32-128, --sweep)
# columns per 128-row program of the grouped (dW chunk layout) transpose: the fastest of 64-512 on moonlet's 704-,
# 1,024- and 1,408-wide codes (H100 probe 2026-11-25; 128 was 1-2% slower)
GROUPED_TRANSPOSE_COLS = 32 if INTERPRET else 256
NVFP4_ADAMW_BLOCKS, NVFP4_WARPS = (64, 4) if INTERPRET else (32, 2)

_GMM_KEY = ["N", "K", "E", "BLOCKWISE", "FAST_ACC", "GATHER_A", "WEIGHTED"]  # gathering GEMMs tune apart


def _set_tma_blocks(nargs) -> None:
    """Autotune pre-hook: the TMA descriptors take the block shapes of the config being run."""
    if isinstance(nargs["a_ptr"], TensorDescriptor):
        nargs["a_ptr"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["b_ptr"].block_shape = [1, nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _with_hook(configs):
    return [
        triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_tma_blocks)
        for c in configs
    ]


# one autotuner per (epilogue, TMA) so that their tuning caches stay apart
_GMM = {e: triton.autotune(c, key=_GMM_KEY)(K.gmm_fp8_kernel) for e, c in _GMM_CONFIGS.items()}
_GMM_TMA = {e: triton.autotune(_with_hook(c), key=_GMM_KEY)(K.gmm_fp8_kernel) for e, c in _GMM_CONFIGS.items()}
_GMM_DW = triton.autotune(_DW_CONFIGS, key=["KA", "N", "E", "EXPERT_SCALES", "FAST_ACC"])(K.gmm_fp8_dw_kernel)


# ---------------------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------------------


def nvfp4_quantize(w: torch.Tensor, tensor_scale: torch.Tensor) -> R.NVFP4Tensor:
    """w[..., K] contiguous -> NVFP4Tensor under the given float32 0-d tensor scale."""
    n_blocks = w.numel() // R.NVFP4_BLOCK
    lead, k = w.shape[:-1], w.shape[-1]
    codes = torch.empty(*lead, k // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(*lead, k // R.NVFP4_BLOCK, dtype=FP8, device=w.device)
    if n_blocks:
        K.nvfp4_quantize_kernel[(triton.cdiv(n_blocks, NVFP4_BLOCKS),)](
            w, codes, scales, tensor_scale, n_blocks, BLOCK_B=NVFP4_BLOCKS, **EXACT
        )
    return R.NVFP4Tensor(codes, scales, tensor_scale)


def nvfp4_dequantize(q: R.NVFP4Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=dtype, device=q.codes.device)
    n_blocks = out.numel() // R.NVFP4_BLOCK
    if n_blocks:
        K.nvfp4_dequantize_kernel[(triton.cdiv(n_blocks, NVFP4_BLOCKS),)](
            q.codes, q.scales, q.tensor_scale, out, n_blocks, BLOCK_B=NVFP4_BLOCKS, **EXACT
        )
    return out


_RULE_IDS = {
    "nearest": K.RULE_NEAREST,
    "seed": K.RULE_SEED,
    "stochastic": K.RULE_STOCHASTIC,
    "residual": K.RULE_RESIDUAL,
}


def nvfp4_adamw(q, grad, exp_avg, exp_avg_sq, residual, c: R.AdamWConstants, rule, key, dither):
    """Launch the fused NVFP4 AdamW kernel in place -> NVFP4UpdateStats (device tensors, no sync)."""
    numel = q.numel()
    n_blocks = numel // R.NVFP4_BLOCK
    dev = grad.device
    n_programs = max(triton.cdiv(n_blocks, NVFP4_ADAMW_BLOCKS), 1)
    # every program writes its partials (zeros for an empty tensor, where no program runs)
    new = torch.zeros if not n_blocks else torch.empty
    flips = new(n_programs, dtype=torch.int32, device=dev)
    sat = new(n_programs, dtype=torch.int32, device=dev)
    sq_err = new(n_programs, dtype=torch.float32, device=dev)
    sq_norm = new(n_programs, dtype=torch.float32, device=dev)
    st_enc = R.nvfp4_encode_scale(q)
    if n_blocks:
        K.nvfp4_adamw_kernel[(n_programs,)](
            q.codes,
            q.scales,
            q.tensor_scale,
            st_enc,
            grad,
            exp_avg,
            exp_avg_sq,
            grad if residual is None else residual,
            flips,
            sq_err,
            sq_norm,
            sat,
            n_blocks,
            *c,
            key - 2**32 if key >= 2**31 else key,  # always an i32 argument: one compiled variant per rule
            R.f32(dither),
            RULE=_RULE_IDS[rule],
            BLOCK_B=NVFP4_ADAMW_BLOCKS,
            **({} if INTERPRET else {"num_warps": NVFP4_WARPS}),
            **EXACT,
        )
    q.tensor_scale.copy_(st_enc)
    return R.NVFP4UpdateStats(
        flips.sum(dtype=torch.int64), sq_err.sum(), sq_norm.sum(), sat.sum(dtype=torch.int64), numel
    )


# ---------------------------------------------------------------------------------------------------------
# FP8 quantisers
# ---------------------------------------------------------------------------------------------------------


def quantize_rows(x: torch.Tensor, blockwise: bool, swiglu_input: bool = False, fold=None):
    """x[M,C] (or gate|up [M,2C] with swiglu_input) -> (e4m3 [M,C], float32 scales [M] or [M, C/128]).

    fold (rowwise): (col_scales float32 [E,C], offsets[E] int32 of x's grouped rows): quantise x[r, c] *
    col_scales[e(r), c] instead (a weight's scales along the reduction, folded into this left operand)."""
    m = x.shape[0]
    c = x.shape[1] // 2 if swiglu_input else x.shape[1]
    if fold is not None and (blockwise or fold[0].stride(1) != 1):
        raise ValueError("quantize_rows: fold needs rowwise scaling and col_scales with unit column stride")
    q = torch.empty(m, c, dtype=FP8, device=x.device)
    one_pass, block_m, parts = False, QUANT_ROWS, (0, 0, 0)
    if blockwise:
        s = torch.empty(m, triton.cdiv(c, BLOCK), dtype=torch.float32, device=x.device)
        block_c = BLOCK
    else:
        s = torch.empty(m, dtype=torch.float32, device=x.device)
        block_c, *parts = pow2_parts(c)
        width = block_c + sum(parts)
        elements = ONE_PASS_ELEMENTS if fold is None else ONE_PASS_ELEMENTS_FOLD
        one_pass = width <= elements
        if one_pass:  # whole rows in registers: read x once
            # folded rows count output values (act as gate|up or stored: 4 rows of 704 were the fastest of both)
            block_m = _prev_power_of_2(elements // width // (2 if swiglu_input and fold is None else 1))
        else:
            block_c, parts = 256, (0, 0, 0)
    if m and c:
        cs, offsets = fold if fold is not None else (s, s)
        K.fp8_quant_rows_kernel[(triton.cdiv(m, block_m), triton.cdiv(c, BLOCK) if blockwise else 1)](
            x,
            q,
            s,
            cs,
            offsets,
            m,
            c,
            offsets.shape[0],
            x.stride(0),
            q.stride(0),
            s.stride(0),
            cs.stride(0),
            FOLD=fold is not None,
            BLOCK_E=triton.next_power_of_2(offsets.shape[0]) if fold is not None else 1,
            SWIGLU_INPUT=swiglu_input,
            BLOCKWISE=blockwise,
            ONE_PASS=one_pass,
            BLOCK_M=block_m,
            BLOCK_C=block_c,
            PART1=parts[0],
            PART2=parts[1],
            PART3=parts[2],
            num_warps=ROW_WARPS,
            **EXACT,
        )
    return q, s


class WeightOperand(NamedTuple):
    """An e4m3 weight as the B operand of gmm_fp8_kernel: strides (expert, reduction, output column)."""

    q: torch.Tensor
    scales: torch.Tensor
    strides: tuple[int, int, int]
    scale_strides: tuple[int, int, int]


def _weight_rowwise(w: torch.Tensor, reduce_dim: int, transpose: bool, both: bool = False):
    """w[E,K,N] -> (e4m3, scales[E, other dim], the codes in w's layout or None) with one scale per slice along
    reduce_dim (1 or 2).

    transpose: q is laid out [E, other, reduce] (reduction contiguous), else like w ([E,K,N] contiguous). both
    (with transpose, reduce_dim 1): the same pass also writes the codes as [E,K,N] when one register slab holds a
    whole column (K a power of two, K and N multiples of 4); else the third value is None.
    """
    e, k, n = w.shape
    if reduce_dim == 2 and w.is_contiguous() and w.numel():  # rows of N: the row quantiser over [E*K, N]
        q, s = quantize_rows(w.view(e * k, n), blockwise=False)
        return q.view(e, k, n), s.view(e, k), None
    other_dim = 3 - reduce_dim
    r, c = w.shape[reduce_dim], w.shape[other_dim]
    q = torch.empty((e, c, r) if transpose else (e, k, n), dtype=FP8, device=w.device)
    s = torch.empty(e, c, dtype=torch.float32, device=w.device)
    q_r, q_c = (1, r) if transpose else (q.stride(reduce_dim), q.stride(other_dim))
    block_r, *parts = pow2_parts(r)
    # one pass when the slab's power-of-two row parts add up to r (measured: a padded 704 -> 1024 slab is slower than
    # two passes) and hold at least 8 columns
    one_pass = block_r + sum(parts) == r and r * 8 <= ONE_PASS_SLAB
    block_c = _prev_power_of_2(ONE_PASS_SLAB // r) if one_pass else QUANT_COLS
    if not one_pass:
        block_r, parts = QUANT_COLS, (0, 0, 0)
    both = both and transpose and reduce_dim == 1 and one_pass and block_r == r and r % 4 == 0 and c % 4 == 0
    q2 = torch.empty(e, k, n, dtype=FP8, device=w.device) if both else None
    if q.numel():
        K.fp8_quant_weight_rowwise_kernel[(triton.cdiv(c, block_c), e)](
            w,
            q.view(torch.int32) if both else q,
            q2.view(torch.int32) if both else q,
            s,
            r,
            c,
            w.stride(0),
            w.stride(reduce_dim),
            w.stride(other_dim),
            q.stride(0),
            q_r,
            q_c,
            s.stride(0),
            ONE_PASS=one_pass,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            PART1=parts[0],
            PART2=parts[1],
            PART3=parts[2],
            BOTH=both,
            num_warps=WEIGHT_WARPS if one_pass else 4,
            **EXACT,
        )
    return q, s, q2


def _weight_scales_rowwise(w: torch.Tensor, reduce_dim: int, transpose: bool, both: bool = False):
    """`_weight_rowwise` for a GEMM's weight operand: dead slices revived (as R.revive_dead_slices), as the reference's
    quantize_weight."""
    q, s, q2 = _weight_rowwise(w, reduce_dim, transpose, both)
    if s.numel():  # one launch in place of the reference's five torch ops
        K.revive_dead_slices_kernel[(s.shape[0],)](s, s.shape[1], BLOCK_S=triton.next_power_of_2(s.shape[1]))
    return q, s, q2


def _weight_blockwise(w: torch.Tensor, write_q: bool, write_qt: bool):
    """w[E,K,N] -> (q[E,K,N] or None, qt[E,N,K] or None, scales[E, K/128, N/128]) with 128x128 tiles."""
    e, k, n = w.shape
    q = torch.empty(e, k, n, dtype=FP8, device=w.device) if write_q else None
    qt = torch.empty(e, n, k, dtype=FP8, device=w.device) if write_qt else None
    s = torch.empty(e, triton.cdiv(k, BLOCK), triton.cdiv(n, BLOCK), dtype=torch.float32, device=w.device)
    if s.numel():
        K.fp8_quant_weight_blockwise_kernel[s.shape](
            w,
            w if q is None else q,
            w if qt is None else qt,
            s,
            k,
            n,
            *w.stride(),
            WRITE_Q=write_q,
            WRITE_QT=write_qt,
            **EXACT,
        )
    return q, qt, s


def quantize_weight(w: torch.Tensor, blockwise: bool, pass_: str) -> WeightOperand:
    """w[E,K,N] -> B operand of the forward (x @ w, reduce K) or dgrad (dy @ w^T, reduce N) fp8 GEMM."""
    e, k, n = w.shape
    if blockwise:
        kb, nb = triton.cdiv(k, BLOCK), triton.cdiv(n, BLOCK)
        if pass_ == "fwd":
            _, qt, s = _weight_blockwise(w, False, True)
            return WeightOperand(qt, s, (n * k, 1, k), (kb * nb, nb, 1))
        q, _, s = _weight_blockwise(w, True, False)
        return WeightOperand(q, s, (k * n, 1, n), (kb * nb, 1, nb))
    if pass_ == "fwd":
        qt, s, _ = _weight_scales_rowwise(w, reduce_dim=1, transpose=True)
        return WeightOperand(qt, s, (n * k, 1, k), (n, 0, 1))
    q, s, _ = _weight_scales_rowwise(w, reduce_dim=2, transpose=True)
    return WeightOperand(q, s, (k * n, 1, n), (k, 0, 1))


def transpose_codes(q: torch.Tensor) -> torch.Tensor:
    """e4m3 q[E,K,N] contiguous (K, N multiples of 4) -> qt[E,N,K] contiguous, bitwise the same codes."""
    if not q.is_contiguous() or q.shape[1] % 4 or q.shape[2] % 4:
        raise ValueError(f"transpose_codes needs contiguous codes with K, N multiples of 4, got {tuple(q.shape)}")
    e, k, n = q.shape
    qt = torch.empty(e, n, k, dtype=q.dtype, device=q.device)
    if q.numel():
        grid = (e, triton.cdiv(k, TRANSPOSE_BLOCK), triton.cdiv(n, TRANSPOSE_BLOCK))
        K.fp8_transpose_kernel[grid](
            q.view(torch.int32), qt.view(torch.int32), k, n, BLOCK_K=TRANSPOSE_BLOCK, BLOCK_N=TRANSPOSE_BLOCK
        )
    return qt


def quantize_weight_both(w: torch.Tensor, blockwise: bool, fold_pass: str):
    """w[E,K,N] -> (q [E,K,N] (the dgrad operand's layout), qt [E,N,K] (the forward's), float32 scales), quantised
    once: 128x128 tiles (blockwise) or, rowwise, one scale per slice along the reduction of the pass that is not
    fold_pass ('fwd' or 'dgrad'); fold_pass's GEMM reads the codes with unit scales and folds the scales into its
    left operand (`quantize_rows(fold=...)`, `swiglu_backward_rows(fold=...)`), so that one set of codes serves
    both GEMMs. The other layout is `transpose_codes` of the first, except rowwise with fold_pass 'dgrad' (w_up)
    when one register slab holds a whole column: `_weight_rowwise(both=True)` writes both."""
    if blockwise:
        q, _, s = _weight_blockwise(w, True, False)
        return q, transpose_codes(q), s
    if fold_pass == "dgrad":  # scales per output column over K: the forward's transposed quantiser
        qt, s, q = _weight_scales_rowwise(w, reduce_dim=1, transpose=True, both=True)
        return transpose_codes(qt) if q is None else q, qt, s
    q, s, _ = _weight_scales_rowwise(w, reduce_dim=2, transpose=False)  # scales per row over N: contiguous rows
    return q, transpose_codes(q), s


_UNIT_SCALES: dict[torch.device, torch.Tensor] = {}


def _unit_scale(device: torch.device) -> torch.Tensor:
    """A float32 [1] holding 1.0 on device (the scales of a weight operand whose scales were folded away)."""
    if device not in _UNIT_SCALES:
        _UNIT_SCALES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return _UNIT_SCALES[device]


def weight_operand(q, qt, scales, blockwise: bool, pass_: str, fold_pass: str) -> WeightOperand:
    """The B operand of the forward (qt, reduce K) or dgrad (q, reduce N) GEMM from `quantize_weight_both`'s
    output (the layout a pass does not read may be None)."""
    e, k, n = q.shape if q is not None else (qt.shape[0], qt.shape[2], qt.shape[1])
    if blockwise:
        kb, nb = triton.cdiv(k, BLOCK), triton.cdiv(n, BLOCK)
        if pass_ == "fwd":
            return WeightOperand(qt, scales, (n * k, 1, k), (kb * nb, nb, 1))
        return WeightOperand(q, scales, (k * n, 1, n), (kb * nb, 1, nb))
    codes, strides = (qt, (n * k, 1, k)) if pass_ == "fwd" else (q, (k * n, 1, n))
    if pass_ == fold_pass:  # the scales run along this GEMM's reduction: folded into its left operand
        return WeightOperand(codes, _unit_scale(scales.device), strides, (0, 0, 0))
    return WeightOperand(codes, scales, strides, (scales.shape[1], 0, 1))


def quantize_grouped_cols(x: torch.Tensor, offsets: torch.Tensor, swiglu_input: bool = False):
    """x[M,C] grouped rows -> (qt e4m3 [C, chunks*128], float32 scales [chunks, C]) for the dW GEMM.

    chunks = M/128 + E bounds the 128-row pieces of all groups; chunk c's rows sit, transposed and
    zero-padded, in columns [128c, 128c + 128) of qt (unused slots stay unwritten and are never read).
    """
    m = x.shape[0]
    c = x.shape[1] // 2 if swiglu_input else x.shape[1]
    n_experts = offsets.shape[0]
    n_chunks = R.grouped_col_chunks(m, n_experts)
    qt = torch.empty(c, n_chunks * BLOCK, dtype=FP8, device=x.device)
    s = torch.ones(n_chunks, c, dtype=torch.float32, device=x.device)
    if m and c:
        grid = (n_chunks * triton.cdiv(c, QUANT_COLS),)
        K.fp8_quant_grouped_cols_kernel[grid](
            x,
            qt,
            s,
            offsets,
            m,
            c,
            n_experts,
            x.stride(0),
            qt.stride(0),
            SWIGLU_INPUT=swiglu_input,
            BLOCK_C=QUANT_COLS,
            BLOCK_E=triton.next_power_of_2(n_experts),
            **EXACT,
        )
    return qt, s


def quantize_dw_cols(x, offsets, idx=None, mult=None, weights=None, w_idx=None, x_scales=None, *, pos=None, amax=None):
    """Grouped rows r of x (x[idx[r]] when idx is given; x may be e4m3 codes with float32 row scales x_scales),
    times mult[r] float32 and weights[w_idx[r]] when given -> (qt e4m3 [C, chunks*128] in quantize_grouped_cols'
    chunk layout, float32 scales [E, C]): one scale per column, shared by the experts (an empty expert's row is
    ZERO_SLICE_SCALE), which the dW GEMM applies once to the whole sum.

    Gathering, idx is a routing's token[r] = order[r] // K and pos[T*K] int32 the inverse of order (grouped row of
    each token slot): the column amax is then taken over x's T token rows, each times its largest row factor, a
    pass over T rows instead of T*K. amax: int32 [C] zeros to use as the amax buffer (the caller's share of one
    fill)."""
    m = x.shape[0] if idx is None else idx.shape[0]
    c, n_experts = x.shape[1], offsets.shape[0]
    if c % 4:
        raise ValueError(f"quantize_dw_cols: C must be a multiple of 4, got {c}")
    n_tok = x.shape[0]
    if idx is not None and (
        pos is None or pos.shape[0] != idx.shape[0] or pos.shape[0] < n_tok or pos.shape[0] % max(n_tok, 1)
    ):
        raise ValueError(
            "quantize_dw_cols: gathering needs pos, the routing's grouped row of each of the T*K token slots "
            f"(K >= 1; T = {n_tok} rows of x, {m} grouped rows, pos of {None if pos is None else pos.shape[0]})"
        )
    n_chunks = R.grouped_col_chunks(m, n_experts)
    qt = torch.empty(c, n_chunks * BLOCK, dtype=FP8, device=x.device)
    if not (n_experts and c and m):
        return qt, torch.full((n_experts, c), R.ZERO_SLICE_SCALE, dtype=torch.float32, device=x.device)
    s = torch.empty(n_experts, c, dtype=torch.float32, device=x.device)  # the kernel writes every expert's row
    amax = torch.zeros(c, dtype=torch.int32, device=x.device) if amax is None else amax
    factors = dict(X_SCALES=x_scales is not None, MULT=mult is not None, WEIGHTED=weights is not None)
    row_args = (
        offsets if x_scales is None else x_scales,
        offsets if mult is None else mult,
        offsets if weights is None else weights,
        offsets if w_idx is None else w_idx,
    )
    if idx is None:
        _dw_cols_pass(1, x, offsets, None, row_args, factors, qt, s, amax, m)
    else:  # over the token rows, each times the largest factor of its top_k grouped rows
        _dw_cols_pass(1, x, offsets, pos, row_args, factors, qt, s, amax, n_tok, top_k=pos.shape[0] // n_tok)
    _dw_cols_pass(2, x, offsets, idx, row_args, factors, qt, s, amax, m)
    return qt, s


def _dw_cols_pass(phase, x, offsets, idx, row_args, factors, qt, s, amax, m, top_k=0):
    """One launch of fp8_quant_dw_cols_kernel over m grouped rows (see quantize_dw_cols); top_k > 0: phase 1 over m
    token rows, idx their slots' grouped rows (pos)."""
    n_experts, c = offsets.shape[0], x.shape[1]
    n_chunks = triton.cdiv(m, BLOCK) if top_k else R.grouped_col_chunks(m, n_experts)
    K.fp8_quant_dw_cols_kernel[(n_chunks * triton.cdiv(c, DW_COLS_BLOCK),)](
        x,
        offsets if idx is None else idx,
        *row_args,
        qt.view(torch.int32),
        s,
        amax,
        offsets,
        m,
        c,
        n_experts,
        x.stride(0),
        qt.stride(0) // 4,
        GATHER=idx is not None and not top_k,
        **factors,
        PHASE=phase,
        BLOCK_C=DW_COLS_BLOCK,
        BLOCK_E=triton.next_power_of_2(n_experts),
        TOP_K=top_k,
        **EXACT,
        **({} if INTERPRET else {"num_warps": DW_COLS_WARPS}),
    )


def transpose_grouped_codes(q: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """e4m3 grouped rows q[M,C] (C a multiple of 4) -> [C, chunks*128] in quantize_grouped_cols' chunk layout."""
    m, c = q.shape
    n_experts = offsets.shape[0]
    n_chunks = R.grouped_col_chunks(m, n_experts)
    qt = torch.empty(c, n_chunks * BLOCK, dtype=FP8, device=q.device)
    if m and c and n_experts:
        K.fp8_transpose_grouped_kernel[(n_chunks * triton.cdiv(c, GROUPED_TRANSPOSE_COLS),)](
            q.contiguous().view(torch.int32),
            qt.view(torch.int32),
            offsets,
            m,
            c,
            n_experts,
            qt.stride(0) // 4,
            BLOCK_C=GROUPED_TRANSPOSE_COLS,
            BLOCK_E=triton.next_power_of_2(n_experts),
        )
    return qt


# ---------------------------------------------------------------------------------------------------------
# FP8 grouped GEMM
# ---------------------------------------------------------------------------------------------------------


def gemm(
    qa,
    sa,
    blockwise,
    b: WeightOperand,
    offsets,
    out,
    n,
    k,
    *,
    epilogue=K.EPILOGUE_STORE,
    h=None,
    q_out=None,
    fast=False,
    a_idx=None,
    wts=None,
    w_idx=None,
    dw=None,
):
    """Grouped fp8 GEMM of rows qa (scales sa) with the weight operand b into out[M, ...] (or the fused epilogue).

    fast (rowwise only): accumulate in Hopper's fp8 wgmma accumulator throughout instead of promoting each K block
    into an fp32 one (torch's use_fast_accum). a_idx[M]: grouped row r reads qa[a_idx[r]] (else qa[r]). wts, w_idx,
    dw[M] float32 (EPILOGUE_SWIGLU_BWD): routing weights wts[w_idx[r]] scale the product, and dw[w_idx[r]] gets
    their gradient, summed over column tiles in a fixed order (deterministic)."""
    m, n_experts = out.shape[0], offsets.shape[0]
    if m == 0 or n == 0:
        return

    def grid(meta):
        return ((triton.cdiv(m, meta["BLOCK_M"]) + n_experts + 1) * triton.cdiv(n, meta["BLOCK_N"]),)

    q, sq = (offsets, offsets) if q_out is None else q_out
    tma = a_idx is None and _use_tma(qa, b)  # a TMA descriptor cannot gather rows on Hopper
    kernel = (_GMM_TMA if tma else _GMM)[epilogue]
    partials = None
    if dw is not None:  # one row of partial sums per column tile of the narrowest config
        tiles = triton.cdiv(n, min(c.kwargs["BLOCK_N"] for c in kernel.configs))
        partials = torch.zeros(tiles, m, dtype=torch.float32, device=out.device)
    kernel[grid](
        TensorDescriptor.from_tensor(qa, [16, 16]) if tma else qa,
        sa,
        TensorDescriptor.from_tensor(b.q, [1, 16, 16]) if tma else b.q,
        b.scales,
        out,
        offsets if h is None else h,
        q,
        sq,
        offsets,
        offsets if a_idx is None else a_idx,
        offsets if wts is None else wts,
        offsets if w_idx is None else w_idx,
        offsets if partials is None else partials,
        m,
        n,
        k,
        n_experts,
        qa.stride(0),
        sa.stride(0),
        sa.stride(1) if blockwise else 0,
        *b.strides,
        *b.scale_strides,
        out.stride(0),
        0 if h is None else h.stride(0),
        BLOCKWISE=blockwise,
        EPILOGUE=epilogue,
        UPCAST=INTERPRET,
        FAST_ACC=fast,
        BLOCK_E=triton.next_power_of_2(n_experts),
        TMA=tma,
        GATHER_A=a_idx is not None,
        WEIGHTED=wts is not None,
    )
    if partials is not None:
        dw.add_(partials.sum(0))


# The rowwise grouped GEMMs of the routed layer (Hopper's fast accumulation, bf16 out) have a second kernel on
# sm_90, bit-identical to gmm_fp8_kernel (the same wgmma accumulation order over K and the same epilogue products;
# gpu_lowprec.py compares them) and faster at some shapes (bench/RESULTS.md):
# - contiguous rows (the down and dgrad-up GEMMs): torch's CUTLASS grouped GEMM (torch._scaled_grouped_mm);
# - gathered rows (the up and dgrad-down GEMMs, row r read at token[r]): quack's warp-specialised CuTe DSL GEMM, when
#   quack is installed (`_quack_gemm`).
# Under "auto" each shape (N, K, E, rows to the next power of two, device, gathered) runs whichever of the two
# measured faster the first time it was seen, as the autotuner picks configs; since both give the same bits, the pick
# cannot change a result. "triton" or "cutlass" (the CUTLASS-built kernel for each GEMM) forces one. The setting is
# process-wide: a backward runs under the one active then.
FP8_GEMM_KERNELS = ("auto", "triton", "cutlass")
_fp8_gemm_kernel = _triton_ops.env_choice("NMOE_KERNELS_FP8_GEMM", FP8_GEMM_KERNELS, "auto")
CUTLASS_PICKS: dict[tuple, bool] = {}  # (N, K, E, rows bucket, device, gathered) -> the CUTLASS kernel was faster
MAX_CUTLASS_GROUPS = 1023  # torch's grouped GEMM prepares its problems with one thread per group, fewer than 1024
_ONES: dict[tuple, torch.Tensor] = {}


def use_fp8_gemm_kernel(name: str):
    """Run the routed layer's rowwise fp8 GEMMs of this block on the given kernel ("auto", "triton" or "cutlass")."""
    return _triton_ops.switched(sys.modules[__name__], "_fp8_gemm_kernel", FP8_GEMM_KERNELS, "fp8 GEMM kernel", name)


def cutlass_unavailable(
    qa: torch.Tensor, sa: torch.Tensor, b: WeightOperand, n: int, k: int, dtype, fast, gathered: bool = False
) -> str:
    """Why the CUTLASS-built kernel cannot run this GEMM ('' when it can): torch's grouped GEMM for contiguous rows,
    quack's for gathered ones."""
    if INTERPRET or not qa.is_cuda:
        return "it needs a CUDA GPU"
    if torch.cuda.get_device_capability(qa.device) != (9, 0):
        return "it is measured and checked on sm_90 (Hopper) only"
    if not gathered and getattr(torch, "_scaled_grouped_mm", None) is None:
        return "this torch has no torch._scaled_grouped_mm"
    if b.scale_strides == (0, 0, 0) and _ones_key(b, n) not in _ONES and torch.cuda.is_current_stream_capturing():
        return "its unit column scales are made outside CUDA graph capture (run one step before capturing)"
    return cutlass_layout_problem(qa, sa, b, n, k, dtype, fast, gathered) or (gathered and _quack_gemm.missing()) or ""


def cutlass_layout_problem(
    qa: torch.Tensor, sa: torch.Tensor, b: WeightOperand, n: int, k: int, dtype, fast, gathered: bool = False
) -> str:
    """What in the operands the CUTLASS-built kernel does not take ('' when nothing): torch's grouped GEMM, or quack's
    for gathered rows (no limit on the experts)."""
    if not fast or dtype != torch.bfloat16:
        return "it runs fast accumulation into bf16 only"
    e = b.q.shape[0]
    if not gathered and not 0 < e <= MAX_CUTLASS_GROUPS:
        return f"it takes 1 to {MAX_CUTLASS_GROUPS} experts, not {e}"
    if b.strides != (n * k, 1, k) or tuple(b.q.shape) != (e, n, k) or not b.q.is_contiguous():
        return "the weight codes must be stored [E, N, K] contiguous"
    if k % 16 or n % 16 or qa.stride(1) != 1 or qa.stride(0) % 16 or qa.data_ptr() % 16:
        return "K, N and the row stride must be multiples of 16 bytes"
    if tuple(sa.shape) != (qa.shape[0],) or not sa.is_contiguous() or b.scale_strides not in ((n, 0, 1), (0, 0, 0)):
        return "it takes one scale per row and one per (expert, column)"
    return ""


def _ones_key(b: WeightOperand, n: int) -> tuple:
    return (b.scales.device, b.q.shape[0], n)


def _cutlass_scales(b: WeightOperand, e: int, n: int) -> torch.Tensor:
    """b's column scales as the contiguous float32 [E, N] torch's kernel reads (ones when they were folded away)."""
    if b.scale_strides == (n, 0, 1):
        return b.scales.view(e, n)
    key = _ones_key(b, n)
    if key not in _ONES:
        _ONES[key] = torch.ones(e, n, dtype=torch.float32, device=b.scales.device)
    return _ONES[key]


def _cutlass_gemm(qa, sa, b: WeightOperand, offsets, n):
    e = b.q.shape[0]
    return torch._scaled_grouped_mm(
        qa, b.q.transpose(1, 2), sa, _cutlass_scales(b, e, n), offs=offsets, out_dtype=torch.bfloat16,
        use_fast_accum=True,
    )  # fmt: skip


def _gpu_ms(fn, iters: int = 10) -> float:
    """Mean GPU ms of fn over iters calls after three warm-up calls (no L2 flush: the pick needs no more)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


_QUACK_SHAPES: set[tuple] = set()  # (N, K, E, rows, device) quack has run outside graph capture (compiled, planned)


def _quack_key(qa, b: WeightOperand, n, k, a_idx) -> tuple:
    return (n, k, b.q.shape[0], a_idx.shape[0], qa.device)


def _quack_gemm_into(qa, sa, b: WeightOperand, offsets, n, k, a_idx, out):
    b_kn = torch.as_strided(b.q, (b.q.shape[0], k, n), b.strides)  # [E, K, N] view, K contiguous
    _quack_gemm.gathered_gemm(qa, sa, a_idx, b_kn, _cutlass_scales(b, b.q.shape[0], n), offsets, out)
    if qa.is_cuda and not torch.cuda.is_current_stream_capturing():
        _QUACK_SHAPES.add(_quack_key(qa, b, n, k, a_idx))
    return out


def _quack_ms(qa, sa, b: WeightOperand, offsets, n, k, a_idx, out) -> float:
    """GPU ms of quack's kernel on this shape; inf, with a warning, when it fails (the pick then keeps ours)."""
    try:
        return _gpu_ms(lambda: _quack_gemm_into(qa, sa, b, offsets, n, k, a_idx, out))
    except Exception as err:  # an installed quack that cannot run this shape must not stop the layer
        warnings.warn(f"quack's gathered fp8 GEMM failed at N={n} K={k}, so ours runs it: {err}", stacklevel=2)
        return float("inf")


def _pick_cutlass(qa, sa, b: WeightOperand, offsets, n, k, a_idx=None) -> bool:
    """Whether the CUTLASS-built kernel runs this shape under "auto": measured against ours once per CUTLASS_PICKS key;
    ours while a CUDA graph is being captured before the shape was measured (nothing can be timed then)."""
    m = qa.shape[0] if a_idx is None else a_idx.shape[0]
    key = (n, k, b.q.shape[0], triton.next_power_of_2(m), qa.device, a_idx is not None)
    if key not in CUTLASS_PICKS:
        if torch.cuda.is_current_stream_capturing():
            return False
        out = torch.empty(m, n, dtype=torch.bfloat16, device=qa.device)
        ours = _gpu_ms(lambda: gemm(qa, sa, False, b, offsets, out, n, k, fast=True, a_idx=a_idx))
        if a_idx is None:
            theirs = _gpu_ms(lambda: _cutlass_gemm(qa, sa, b, offsets, n))
        else:
            theirs = _quack_ms(qa, sa, b, offsets, n, k, a_idx, out)
        CUTLASS_PICKS[key] = theirs < ours
    return CUTLASS_PICKS[key]


def gemm_rows(qa, sa, b: WeightOperand, offsets, n: int, k: int, dtype, fast: bool, a_idx=None) -> torch.Tensor:
    """Plain grouped fp8 GEMM of the rows qa[M,K] (rowwise scales sa[M]; grouped row r is qa[a_idx[r]] when a_idx
    [R] int32 is given) with b -> new [M or R, n] in dtype; rows past offsets[-1] are undefined (the routed layer never
    reads them). Runs `gemm` or, see FP8_GEMM_KERNELS, a bit-identical CUTLASS-built kernel."""
    m = qa.shape[0] if a_idx is None else a_idx.shape[0]
    gathered = a_idx is not None
    if m == 0:
        return torch.empty(0, n, dtype=dtype, device=qa.device)
    if _fp8_gemm_kernel != "triton":
        why = cutlass_unavailable(qa, sa, b, n, k, dtype, fast, gathered)
        if not why and gathered and qa.is_cuda and torch.cuda.is_current_stream_capturing():
            if _quack_key(qa, b, n, k, a_idx) not in _QUACK_SHAPES:  # it would compile and plan while capturing
                why = "its first call at this shape is made outside CUDA graph capture (run one step before capturing)"
        if _fp8_gemm_kernel == "cutlass" and why:
            raise ValueError(f"NMOE_KERNELS_FP8_GEMM=cutlass cannot run this GEMM: {why}; use 'auto' or 'triton'")
        if not why and (_fp8_gemm_kernel == "cutlass" or _pick_cutlass(qa, sa, b, offsets, n, k, a_idx)):
            if not gathered:
                return _cutlass_gemm(qa, sa, b, offsets, n)
            out = torch.empty(m, n, dtype=dtype, device=qa.device)
            return _quack_gemm_into(qa, sa, b, offsets, n, k, a_idx, out)
    out = torch.empty(m, n, dtype=dtype, device=qa.device)
    gemm(qa, sa, False, b, offsets, out, n, k, fast=fast, a_idx=a_idx)
    return out


def _use_tma(qa: torch.Tensor, b: WeightOperand) -> bool:
    """TMA operands when the grouped GEMM variant is 'tma' and both are laid out for it (B stored [E, out, K])."""
    if _triton_ops._gemm_variant != "tma":
        return False
    e, out_dim, k = b.q.shape if b.strides[1] == 1 else (0, 0, 0)
    return (
        e > 0
        and b.q.is_contiguous()
        and b.strides == (out_dim * k, 1, k)
        and _triton_ops._tma_ok(qa)
        and _triton_ops._tma_ok(b.q)
    )


def wgrad(a, b, offsets, dtype, blockwise, fast=False, a_swiglu=False):
    """dW[e] = a[rows of e]^T @ b[rows of e] -> [E, KA, N] in dtype, both operands quantised per column: per 128-row
    chunk (blockwise; a may then be a gate|up pre-activation) or shared by the experts (rowwise; fast as in `gemm`)."""
    if a.shape[0] == 0:
        ka = a.shape[1] // 2 if a_swiglu else a.shape[1]
        return torch.zeros(offsets.shape[0], ka, b.shape[1], dtype=dtype, device=a.device)
    if blockwise:
        qa, sa = quantize_grouped_cols(a, offsets, a_swiglu)
        qb, sb = quantize_grouped_cols(b, offsets)
    elif a_swiglu:
        raise ValueError("wgrad: a gate|up operand needs blockwise scaling")
    else:
        qa, sa = quantize_dw_cols(a, offsets)
        qb, sb = quantize_dw_cols(b, offsets)
    return wgrad_codes(qa, sa, qb, sb, offsets, dtype, expert_scales=not blockwise, fast=fast)


def wgrad_codes(qa, sa, qb, sb, offsets, dtype, expert_scales, fast=False):
    """dW[e] [E, KA, N] in dtype from chunk-layout codes qa[KA, slots], qb[N, slots] with column scales per expert
    (sa[E, KA], sb[E, N]; quantize_dw_cols gives every expert the same row) or per 128-row chunk (sa[chunks, KA],
    sb[chunks, N])."""
    n_experts, ka, n = offsets.shape[0], qa.shape[0], qb.shape[0]
    out = torch.empty(n_experts, ka, n, dtype=dtype, device=qa.device)

    def grid(meta):
        return (n_experts * triton.cdiv(ka, meta["BLOCK_KA"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _GMM_DW[grid](
        qa,
        sa,
        qb,
        sb,
        out,
        offsets,
        ka,
        n,
        n_experts,
        qa.stride(0),
        qb.stride(0),
        out.stride(0),
        out.stride(1),
        UPCAST=INTERPRET,
        BLOCK_E=triton.next_power_of_2(n_experts),
        EXPERT_SCALES=expert_scales,
        FAST_ACC=fast and expert_scales,
    )
    return out


def wgrad_in_input_dtype(a, b, offsets, dtype):
    """dW[e] = a[rows of e]^T @ b[rows of e] by the bf16/fp32 grouped GEMM on the unquantised operands."""
    out = torch.empty(offsets.shape[0], a.shape[1], b.shape[1], dtype=dtype, device=a.device)
    return _triton_ops._launch_dw(a, b, offsets, out)


class GroupedMMFP8(torch.autograd.Function):
    """grouped_mm on e4m3 operands quantised inside (bf16/fp32 in, x.dtype out); fp8 forward and dgrad, dW in fp8
    or (wgrad_fp8 False) by the input-dtype grouped GEMM."""

    @staticmethod
    def forward(ctx, x, w, offsets, scaling, wgrad_fp8, fast_accum):
        """x[M,K], w[E,K,N], offsets[E] int32, scaling 'rowwise'|'blockwise' -> [M,N] (x.dtype)."""
        blockwise = scaling == "blockwise"
        qx, sx = quantize_rows(x, blockwise)
        out = torch.empty(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
        wop = quantize_weight(w, blockwise, "fwd")
        gemm(qx, sx, blockwise, wop, offsets, out, w.shape[2], w.shape[1], fast=fast_accum)
        ctx.save_for_backward(x, w, offsets)
        ctx.blockwise, ctx.wgrad_fp8, ctx.fast = blockwise, wgrad_fp8, fast_accum
        return out

    @staticmethod
    def backward(ctx, dy):
        """dy[M,N] -> (dx[M,K] x.dtype, dw[E,K,N] w.dtype, None, ...)."""
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            qdy, sdy = quantize_rows(dy, ctx.blockwise)
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            wop = quantize_weight(w, ctx.blockwise, "dgrad")
            gemm(qdy, sdy, ctx.blockwise, wop, offsets, dx, w.shape[1], w.shape[2], fast=ctx.fast)
        if ctx.needs_input_grad[1]:
            if ctx.wgrad_fp8:
                dw = wgrad(x, dy, offsets, w.dtype, ctx.blockwise, ctx.fast)
            else:
                dw = wgrad_in_input_dtype(x, dy.to(x.dtype), offsets, w.dtype)
        return dx, dw, None, None, None, None


class _Recipe(NamedTuple):
    blockwise: bool
    wgrad_fp8: bool
    fast: bool


# Each expert weight is quantised once per forward (`quantize_weight_both`) and the backward reuses the codes.
# Rowwise, w_up's forward column scales fold into d_pre's quantisation (its dgrad GEMM) and w_down's dgrad row scales
# into act's (its forward GEMM): both operands are grouped rows, which know their expert.
UP_FOLD, DOWN_FOLD = "dgrad", "fwd"


def _mlp_forward(qx, sx, offsets, w_up, w_down, r: _Recipe, m: int, dtype, token=None):
    """fp8 up GEMM (+ SwiGLU) and down GEMM over m grouped rows of the quantised rows qx (row token[g] for grouped
    row g when given) -> (out[m,D], pre[m,2H], act, codes (q_up [E,D,2H], s_up, q_down [E,H,D], s_down): the
    weights' dgrad operands for `_mlp_backward`). act, what the dW of the down projection reads: rowwise with a
    bf16 dW, act[m,H] in dtype; rowwise with an fp8 dW, (its folded e4m3 codes [m,H], row scales [m]); else None."""
    d, h = w_up.shape[1], w_down.shape[1]
    dev = qx.device
    q_up, qt_up, s_up = quantize_weight_both(w_up, r.blockwise, UP_FOLD)
    q_dn, qt_dn, s_dn = quantize_weight_both(w_down, r.blockwise, DOWN_FOLD)
    up = weight_operand(None, qt_up, s_up, r.blockwise, "fwd", UP_FOLD)
    act_fold = None if r.blockwise else (s_dn, offsets)
    routed_plain = token is not None and r.wgrad_fp8 and not r.blockwise  # the up GEMM is gemm_rows' to allocate
    pre = None if routed_plain else torch.empty(m, 2 * h, dtype=dtype, device=dev)
    act = None
    if r.blockwise:
        q_act = torch.empty(m, h, dtype=FP8, device=dev)
        s_act = torch.empty(m, triton.cdiv(h, BLOCK), dtype=torch.float32, device=dev)
        gemm(qx, sx, True, up, offsets, pre, h, d, epilogue=K.EPILOGUE_SWIGLU_QUANT, h=pre, q_out=(q_act, s_act),
             a_idx=token)  # fmt: skip
    elif r.wgrad_fp8:  # the fp8 dW reads act's codes: no bf16 act
        if routed_plain:  # no row past offsets[-1] is read
            pre = gemm_rows(qx, sx, up, offsets, 2 * h, d, dtype, r.fast, a_idx=token)
        else:
            gemm(qx, sx, False, up, offsets, pre, 2 * h, d, fast=r.fast)
        q_act, s_act = quantize_rows(pre, False, swiglu_input=True, fold=act_fold)
        act = (q_act, s_act)
    else:  # the bf16 dW of the down projection reads act: the up GEMM's epilogue writes it beside pre
        act = torch.empty(m, h, dtype=dtype, device=dev)
        gemm(qx, sx, False, up, offsets, act, h, d, epilogue=K.EPILOGUE_SWIGLU_STORE, h=pre, fast=r.fast, a_idx=token)
    if isinstance(act, torch.Tensor):
        q_act, s_act = quantize_rows(act, False, fold=act_fold)
    down = weight_operand(None, qt_dn, s_dn, r.blockwise, "fwd", DOWN_FOLD)
    if token is not None and not r.blockwise:  # routed: the combine reads no row past offsets[-1]
        out = gemm_rows(q_act, s_act, down, offsets, d, h, dtype, r.fast)
    else:
        out = torch.empty(m, d, dtype=dtype, device=dev)
        gemm(q_act, s_act, r.blockwise, down, offsets, out, d, h, fast=r.fast)
    return out, pre, act, (q_up, s_up, q_dn, s_dn)


def _mlp_backward(dy, x, offsets, w_up, w_down, codes, pre, act, r: _Recipe, routing=None, x_codes=None):
    """dy (token order [T,D] with routing = (token, weights, order, pos), else grouped [m,D]), codes from
    `_mlp_forward`, x_codes: x's e4m3 rows and row scales as the forward quantised them (rowwise fp8 dW) ->
    (d_rows[m,D] grouped, dw_up, dw_down, d_weights[m] float32 by routing slot or None)."""
    m, h = pre.shape[0], w_down.shape[1]
    d = w_up.shape[1]
    q_up, s_up, q_dn, s_dn = codes
    token, weights, order, pos = routing if routing is not None else (None, None, None, None)
    qdy, sdy = quantize_rows(dy, r.blockwise)
    # one zero fill: the routing weights' gradient (dropped slots get none) and the dW column quantisers' amaxes
    cols_fp8 = r.wgrad_fp8 and not r.blockwise
    n_weights = 0 if routing is None else m
    zeros = torch.zeros(n_weights + (2 * d if cols_fp8 else 0), dtype=torch.float32, device=dy.device)
    d_weights = None if routing is None else zeros[:m]
    amaxes = (zeros[n_weights : n_weights + d].view(torch.int32), zeros[n_weights + d :].view(torch.int32))
    down = weight_operand(q_dn, None, s_dn, r.blockwise, "dgrad", DOWN_FOLD)
    if r.blockwise:  # the SwiGLU backward in the dgrad GEMM's epilogue; d_pre quantised per 128 columns below
        d_pre = torch.empty(pre.shape, dtype=pre.dtype, device=pre.device)
        gemm(qdy, sdy, True, down, offsets, d_pre, h, d, epilogue=K.EPILOGUE_SWIGLU_BWD, h=pre, a_idx=token,
             wts=weights, w_idx=order, dw=d_weights)  # fmt: skip
    else:  # a plain dgrad GEMM into d_act in pre's dtype (d_pre is rounded to e4m3 after it), then the SwiGLU
        # backward fused with d_pre's rowwise quantiser
        if token is not None:  # routed: the SwiGLU backward reads no row past offsets[-1]
            d_act = gemm_rows(qdy, sdy, down, offsets, h, d, pre.dtype, r.fast, a_idx=token)
        else:
            d_act = torch.empty(m, h, dtype=pre.dtype, device=dy.device)
            gemm(qdy, sdy, False, down, offsets, d_act, h, d, fast=r.fast)
        d_pre, qdp, sdp = _triton_ops.swiglu_backward_rows(
            d_act, pre, offsets, weights, order, d_weights, quantize=True, fold=s_up, store=not r.wgrad_fp8
        )
    route = (token, pos, weights, order)
    dw_down = _dw_down(dy, qdy, sdy, pre, act, s_dn, offsets, w_down.dtype, r, route, amaxes[0])
    if r.blockwise:
        qdp, sdp = quantize_rows(d_pre, True)
    up = weight_operand(q_up, None, s_up, r.blockwise, "dgrad", UP_FOLD)
    if routing is not None and not r.blockwise:  # routed: the combine reads no row past offsets[-1]
        d_rows = gemm_rows(qdp, sdp, up, offsets, d, 2 * h, pre.dtype, r.fast)
    else:
        d_rows = torch.empty(m, d, dtype=pre.dtype, device=pre.device)
        gemm(qdp, sdp, r.blockwise, up, offsets, d_rows, d, 2 * h, fast=r.fast)
    dw_up = _dw_up(x, x_codes, d_pre, qdp, sdp, s_up, offsets, w_up.dtype, r, route[:2], amaxes[1])
    return d_rows, dw_up, dw_down, d_weights


def _dw_down(dy, qdy, sdy, pre, act, s_dn, offsets, dtype, r: _Recipe, route, amax):
    """dW of the down projection [E,H,D] in dtype: rowwise fp8 on act's folded codes (their row scales go into dy's
    codes times the routing weight, requantised per column; amax: the column quantiser's zeroed buffer), blockwise
    fp8 per 128-row chunk, or bf16. route: (token, pos, weights, order), all None unrouted."""
    token, pos, weights, order = route
    if r.wgrad_fp8 and not r.blockwise:
        q_act, s_act = act
        qb, sb = quantize_dw_cols(qdy, offsets, token, s_act, weights, order, sdy, pos=pos, amax=amax)
        qa = transpose_grouped_codes(q_act, offsets)
        return wgrad_codes(qa, torch.reciprocal(s_dn), qb, sb, offsets, dtype, True, r.fast)
    # the token-order dy gathered (and weighted) into grouped rows
    dy_rows = dy.to(pre.dtype) if token is None else _triton_ops.gather_rows(dy, token, weights, order)
    if r.wgrad_fp8:
        return wgrad(pre, dy_rows, offsets, dtype, True, a_swiglu=True)
    if act is None:  # blockwise wrote only the quantised act
        act = R.swiglu_f32(pre).to(pre.dtype)
    return wgrad_in_input_dtype(act, dy_rows, offsets, dtype)


def _dw_up(x, x_codes, d_pre, qdp, sdp, s_up, offsets, dtype, r: _Recipe, route, amax):
    """dW of the up projection [E,D,2H] in dtype: rowwise fp8 on d_pre's folded codes (their row scales go into
    x's codes, x_codes from the forward, requantised per column), blockwise fp8 per 128-row chunk, or bf16.
    route: (token, pos), both None unrouted."""
    token, pos = route
    if r.wgrad_fp8 and not r.blockwise:
        qx, sx = x_codes
        qa, sa = quantize_dw_cols(qx, offsets, token, sdp, x_scales=sx, pos=pos, amax=amax)
        qb = transpose_grouped_codes(qdp, offsets)
        return wgrad_codes(qa, sa, qb, torch.reciprocal(s_up), offsets, dtype, True, r.fast)
    x_rows = x if token is None else _triton_ops.gather_rows(x, token)
    if r.wgrad_fp8:
        return wgrad(x_rows, d_pre, offsets, dtype, True)
    return wgrad_in_input_dtype(x_rows, d_pre, offsets, dtype)


class ExpertMLPFP8(torch.autograd.Function):
    """Grouped SwiGLU expert MLP with fp8 forward and dgrad GEMMs; dW in fp8 or (wgrad_fp8 False) by the
    input-dtype grouped GEMM. Blockwise fuses the activation's quantisation into the up GEMM."""

    @staticmethod
    def forward(ctx, rows, offsets, w_up, w_down, scaling, wgrad_fp8, fast_accum):
        """rows[M,D] grouped by offsets[E], w_up[E,D,2H], w_down[E,H,D] -> [M,D] (rows.dtype)."""
        r = _Recipe(scaling == "blockwise", wgrad_fp8, fast_accum)
        qr, sr = quantize_rows(rows, r.blockwise)
        out, pre, act, codes = _mlp_forward(qr, sr, offsets, w_up, w_down, r, rows.shape[0], rows.dtype)
        ctx.act_is_codes = isinstance(act, tuple)  # rowwise fp8 dW: act's codes, and the rows' for dW up
        saved = (*act, qr, sr) if ctx.act_is_codes else (act, None, None, None)
        ctx.save_for_backward(rows, offsets, w_up, w_down, pre, *saved, *codes)
        ctx.recipe = r
        return out

    @staticmethod
    def backward(ctx, dy):
        """dy[M,D] -> (d_rows, None, dw_up, dw_down, None, None, None)."""
        rows, offsets, w_up, w_down, pre, act, act_scales, qr, sr, *codes = ctx.saved_tensors
        act = (act, act_scales) if ctx.act_is_codes else act
        d_rows, dw_up, dw_down, _ = _mlp_backward(
            dy.contiguous(), rows, offsets, w_up, w_down, codes, pre, act, ctx.recipe, x_codes=(qr, sr)
        )
        return d_rows, None, dw_up, dw_down, None, None, None


def moe_fp8_forward(x, topk_ids, topk_weights, w_up, w_down, scaling: str, wgrad_fp8: bool, fast_accum: bool):
    """Routed SwiGLU experts with fp8 GEMMs, fused as the bf16 moe_experts: tokens are quantised once in token order
    (x forward, dy backward) and gathered by the GEMMs; the routing weights are applied in the combine and in the
    SwiGLU backward (which also yields their gradient). -> (y[T,D] x.dtype, offsets[E] int32, order[R] int64,
    token[R] int32, pos[R] int32, pre[R,2H], act, act_scales, x_codes, x_scales, the weights' codes and scales):
    the `nmoe::moe_experts_fp8` op's outputs, R = T*K. act (R.saved_act): [R,H] in x.dtype and act_scales [0]; act's
    folded codes [R,H] uint8 and their row scales [R]; or both [0]. x_codes [T,D] uint8 and x_scales [T]: x's e4m3
    rows for the fp8 dW of the up projection when act is kept as codes, else both [0]."""
    r = _Recipe(scaling == "blockwise", wgrad_fp8, fast_accum)
    n_tokens, top_k = topk_ids.shape
    routing, token, pos = _triton_ops.route(topk_ids, w_up.shape[0])
    qx, sx = quantize_rows(x, r.blockwise)
    out, pre, act, codes = _mlp_forward(qx, sx, routing.offsets, w_up, w_down, r, token.shape[0], x.dtype, token)
    y = _triton_ops.combine(out, pos, topk_weights.reshape(-1), routing.offsets, n_tokens, top_k)
    codes = (codes[0].view(torch.uint8), codes[1], codes[2].view(torch.uint8), codes[3])  # see the op's schema
    if isinstance(act, tuple):
        act, act_scales = act[0].view(torch.uint8), act[1]
        x_codes = (qx.view(torch.uint8), sx)
    else:
        act, act_scales = x.new_empty(0) if act is None else act, x.new_empty(0, dtype=torch.float32)
        x_codes = (x.new_empty(0, dtype=torch.uint8), x.new_empty(0, dtype=torch.float32))
    return y, routing.offsets, routing.order, token, pos, pre, act, act_scales, *x_codes, *codes


def moe_fp8_backward(dy, x, topk_weights, w_up, w_down, offsets, order, token, pos, pre, act, act_scales, x_codes,
                     x_scales, q_up, s_up, q_down, s_down, scaling, wgrad_fp8, fast_accum):  # fmt: skip
    """dy[T,D] and `moe_fp8_forward`'s saved outputs -> (dx[T,D], d_topk_weights[T,K], dw_up, dw_down)."""
    r = _Recipe(scaling == "blockwise", wgrad_fp8, fast_accum)
    n_tokens, top_k = topk_weights.shape
    routing = (token, topk_weights.reshape(-1), order, pos)
    kept = R.saved_act(scaling, wgrad_fp8)
    act = (act.view(FP8), act_scales) if kept == "codes" else act if kept == "values" else None  # else placeholders
    codes = (q_up.view(FP8), s_up, q_down.view(FP8), s_down)
    d_rows, dw_up, dw_down, d_weights = _mlp_backward(
        dy.contiguous(), x, offsets, w_up, w_down, codes, pre, act, r, routing, (x_codes.view(FP8), x_scales)
    )
    dx = _triton_ops.combine(d_rows, pos, None, offsets, n_tokens, top_k)
    return dx, d_weights.view(n_tokens, top_k).to(topk_weights.dtype), dw_up, dw_down
