"""Triton kernels of the low-precision path (FP8 grouped GEMM, FP8/NVFP4 quantisers, NVFP4 AdamW).

Rounding to bf16 (and to e4m3 under the interpreter) is done in software (an exact float32 add of a power-of-two
"magic" constant, or integer rounding of the float32 bits) and only exactly representable values are converted,
because the Triton interpreter's float32 -> fp8/bf16 conversions truncate; on the GPU e4m3 codes come from the
hardware conversion (round to nearest even, saturating), the same rounding.
Kernels that must match the reference bit for bit use div_rn / sqrt_rn and are launched without FMA
contraction (enable_fp_fusion=False).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from nmoe.kernels._kernels import _locate_tile

E4M3_MAX = tl.constexpr(448.0)
# the scale of an all-zero slice (its codes are all 0): the smallest normal float32, not 1, because a weight's
# scales can be folded into the other GEMM operand, where a zero slice's scale must not set that row's amax
ZERO_SLICE_SCALE = tl.constexpr(2.0**-126)
MIN_SCALE = tl.constexpr(2.0**-125)  # see reference_lowprec.MIN_SCALE
# the interpreter's float32 -> fp8 conversion truncates: round in software there; the GPU's cvt.rn.satfinite rounds
# to nearest even (as torch's CUDA conversion does) in one instruction per pair
SOFTWARE_E4M3 = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
FP8_BLOCK = tl.constexpr(128)

EPILOGUE_STORE = 0  # C = scaled A @ B
EPILOGUE_SWIGLU_QUANT = 1  # H = A @ [Bg | Bu] stored; act = silu(Hg) * Hu (in H's dtype) quantised, 1x128 scales
EPILOGUE_SWIGLU_BWD = 2  # A @ B is d(act); H holds the forward gate|up; C = [d gate | d up]
EPILOGUE_SWIGLU_STORE = 3  # H = A @ [Bg | Bu] stored; act = silu(Hg) * Hu stored in H's dtype (for a bf16 dW)

RULE_NEAREST = 0
RULE_SEED = 1
RULE_STOCHASTIC = 2
RULE_RESIDUAL = 3


# ---------------------------------------------------------------------------------------------------------
# Rounding, codes, hashing
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _round_e4m3(x):
    """float32 -> float32 holding the nearest e4m3 value (ties to even, saturating at ±448)."""
    x = tl.minimum(tl.maximum(x, -E4M3_MAX), E4M3_MAX)
    exponent = (x.to(tl.uint32, bitcast=True) >> 23) & 0xFF
    # quantum of e4m3 at this binade is 2^(max(e, -6) - 3); adding 2^(max(e,-6) + 20) rounds to it exactly
    magic = ((tl.maximum(exponent, 121) + 20) << 23).to(tl.float32, bitcast=True)
    a = tl.abs(x)
    r = (a + magic) - magic
    return tl.where(x < 0, -r, r)


@triton.jit
def _round_bf16(x):
    """float32 -> float32 holding the nearest bfloat16 value (ties to even)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rounded_for(ptr, x):
    """float32 x rounded (to nearest even) to the dtype of ptr (bf16 or fp32), still as float32."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = _round_bf16(x)
    return x


@triton.jit
def _store_rounded(ptr, x, mask):
    """Store float32 x into ptr's dtype with round to nearest even (bf16 and fp32 outputs)."""
    tl.store(ptr, _rounded_for(ptr, x).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_scale(amax):
    return tl.where(amax > 0, tl.maximum(tl.math.div_rn(amax, E4M3_MAX), MIN_SCALE), ZERO_SLICE_SCALE)


@triton.jit
def _fp8_inverse(scale):
    """1 / scale correctly rounded, as the reference's fp8_inverse: quantising multiplies by it (a division per
    element would cost the quantisers a third of their time)."""
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _to_fp8(x, scale):
    """float32 x times _fp8_inverse(scale) (per slice: scale broadcasts against x) rounded to e4m3, nearest even,
    saturating at +-448 (as tl.float8e4nv)."""
    y = x * _fp8_inverse(scale)
    if SOFTWARE_E4M3:
        return _round_e4m3(y).to(tl.float8e4nv)
    return tl.minimum(tl.maximum(y, -E4M3_MAX), E4M3_MAX).to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _e2m1_round(y, bits, STOCHASTIC: tl.constexpr):
    """float32 y (already divided by its scale) -> (e2m1 codes uint8, their float32 values).

    Nearest-even with saturation at +-6 (reference e2m1_encode), or, with STOCHASTIC, unbiased stochastic rounding
    with the uniform u = (bits & 0xFFFFFF) * 2^-24 (reference e2m1_stochastic: up when the distance to the lower
    code exceeds u steps). Integer work on the float32 bits instead of a comparison per code: from 1 to 6 the e2m1
    grid is float32 with one mantissa bit, below 1 it is steps of 0.5. Same results as the references, bit for bit.
    """
    a = tl.minimum(tl.abs(y), 6.0)
    ib = a.to(tl.uint32, bitcast=True)
    low = ib & 0x3FFFFF  # the 22 mantissa bits below the kept one
    twice = a * 2.0
    k = twice.to(tl.int32)  # floor(2a): the code below 1
    frac = twice - k.to(tl.float32)
    if STOCHASTIC:
        u24 = bits & 0xFFFFFF
        up_normal = (low << 2) > u24
        up_sub = frac > u24.to(tl.float32) * 5.9604644775390625e-08
    else:
        up_normal = (low > 0x200000) | ((low == 0x200000) & (((ib >> 22) & 1) == 1))
        up_sub = (frac > 0.5) | ((frac == 0.5) & ((k & 1) == 1))
    kept = (ib & 0xFFC00000) + (up_normal.to(tl.uint32) << 22)
    sub = k + up_sub.to(tl.int32)
    normal = a >= 1.0
    magnitude_code = tl.where(normal, (kept >> 22).to(tl.int32) - 252, sub)
    magnitude = tl.where(normal, kept.to(tl.float32, bitcast=True), sub.to(tl.float32) * 0.5)
    codes = magnitude_code.to(tl.uint8) + 8 * ((y < 0) & (magnitude_code > 0)).to(tl.uint8)
    return codes, tl.where(y < 0, -magnitude, magnitude)


@triton.jit
def _e2m1_magnitude(c):
    """e2m1 code of a magnitude (0..7) -> its value (exact)."""
    e = c >> 1
    m = (c & 1).to(tl.float32)
    binade = tl.where(e == 1, 0.5, tl.where(e == 2, 1.0, 2.0))
    return tl.where(e == 0, m * 0.5, (2.0 + m) * binade)


@triton.jit
def _e2m1_decode(c):
    mag = _e2m1_magnitude(c & 7)
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _element_bits(key, lo, hi):
    """uint32 random bits of elements whose int64 index is hi * 2^32 + lo, in the stream `key` (reference:
    element_bits); lo uint32 per element, hi uint32 (a scalar when a program's elements share it)."""
    return _hash32(lo ^ _hash32(hi ^ key.to(tl.uint32)))


@triton.jit
def _silu_mul(gate, up):
    return gate * tl.sigmoid(gate) * up


# ---------------------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _unpack_codes(packed, BLOCK_B: tl.constexpr):
    """uint8 [B,8] (two codes a byte, even element low) -> codes [B,16]."""
    return tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_B, 16))


@triton.jit
def _pack_codes(codes, BLOCK_B: tl.constexpr):
    lo, hi = tl.split(tl.reshape(codes, (BLOCK_B, 8, 2)))
    return (lo | (hi << 4)).to(tl.uint8)


@triton.jit
def _nvfp4_scales(target, ok, st):
    """Block amax -> (e4m3 block scale as float32 [B], requested float32 scale [B], normalised values [B,16]).

    One correctly rounded division per block; the 16 values are multiplied by its result (the reference too)."""
    amax = tl.max(tl.where(ok, tl.abs(target), 0.0), 1)
    requested = tl.math.div_rn(amax, st * 6.0)
    scale = _round_e4m3(requested)
    denom = scale * st
    inverse = tl.math.div_rn(tl.full(denom.shape, 1.0, tl.float32), tl.where(denom > 0, denom, 1.0))
    y = tl.where(denom[:, None] > 0, target * inverse[:, None], 0.0)
    return scale, requested, y


@triton.jit
def nvfp4_quantize_kernel(w_ptr, codes_ptr, scales_ptr, st_ptr, n_blocks, BLOCK_B: tl.constexpr):
    """w (contiguous, n_blocks x 16) -> packed e2m1 codes and e4m3 block scales under tensor scale *st_ptr."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < n_blocks
    b64 = b.to(tl.int64)
    idx = b64[:, None] * 16 + tl.arange(0, 16)[None, :]
    ok = b_ok[:, None] & (idx >= 0)
    w = tl.load(w_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    scale, _, y = _nvfp4_scales(w, ok, tl.load(st_ptr))
    codes = _pack_codes(_e2m1_round(y, 0, False)[0], BLOCK_B)
    tl.store(codes_ptr + b64[:, None] * 8 + tl.arange(0, 8)[None, :], codes, mask=b_ok[:, None])
    tl.store(scales_ptr + b64, scale.to(tl.float8e4nv), mask=b_ok)


@triton.jit
def nvfp4_dequantize_kernel(codes_ptr, scales_ptr, st_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr):
    """Packed codes, block scales, tensor scale -> out (bf16 or fp32) = (e2m1 * scale) * tensor_scale."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < n_blocks
    b64 = b.to(tl.int64)
    packed = tl.load(codes_ptr + b64[:, None] * 8 + tl.arange(0, 8)[None, :], mask=b_ok[:, None], other=0)
    scale = tl.load(scales_ptr + b64, mask=b_ok, other=0.0).to(tl.float32)
    values = (_e2m1_decode(_unpack_codes(packed, BLOCK_B)) * scale[:, None]) * tl.load(st_ptr)
    idx = b64[:, None] * 16 + tl.arange(0, 16)[None, :]
    _store_rounded(out_ptr + idx, values, b_ok[:, None] & (idx >= 0))


@triton.jit(do_not_specialize=["key"])
def nvfp4_adamw_kernel(
    codes_ptr,
    scales_ptr,
    st_dec_ptr,
    st_enc_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    r_ptr,
    flips_ptr,
    sq_err_ptr,
    sq_norm_ptr,
    sat_ptr,
    n_blocks,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    step_size,
    inv_sqrt_bc2,
    eps,
    decay,
    key,
    dither,
    RULE: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One AdamW step on NVFP4-stored weights, in place; per-program statistics into the *_ptr partial arrays.

    Per 16-block: dequantise (plus the bf16 residual for RULE_RESIDUAL), update the moments and the value,
    recompute the block scale from the updated block's amax under the encode tensor scale, re-quantise with
    the rule. Same float32 op sequence as reference_lowprec.nvfp4_adamw_. Addresses are one int64 base per
    program plus int32 offsets (BLOCK_B * 16 divides 2^32, so a program's element indices share their high
    32 bits).
    """
    pid = tl.program_id(0)
    b_local = tl.arange(0, BLOCK_B)
    b_ok = pid * BLOCK_B + b_local < n_blocks
    ok = b_ok[:, None] & (tl.arange(0, 16)[None, :] >= 0)
    first = pid.to(tl.int64) * (BLOCK_B * 16)  # index of the program's first element
    local = b_local[:, None] * 16 + tl.arange(0, 16)[None, :]  # int32 offsets [BLOCK_B, 16]
    code_ptrs = codes_ptr + first // 2 + b_local[:, None] * 8 + tl.arange(0, 8)[None, :]
    scale_ptrs = scales_ptr + first // 16 + b_local
    codes_old = _unpack_codes(tl.load(code_ptrs, mask=b_ok[:, None], other=0), BLOCK_B)
    scale_old = tl.load(scale_ptrs, mask=b_ok, other=0.0).to(tl.float32)
    st_enc = tl.load(st_enc_ptr)
    old = (_e2m1_decode(codes_old) * scale_old[:, None]) * tl.load(st_dec_ptr)
    w = old
    if RULE == 3:
        w = old + tl.load(r_ptr + first + local, mask=ok, other=0.0).to(tl.float32)

    g = tl.load(grad_ptr + first + local, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + first + local, mask=ok, other=0.0)
    v = tl.load(v_ptr + first + local, mask=ok, other=0.0)
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    target = w * decay - tl.math.div_rn(m, denom) * step_size

    scale, requested, y = _nvfp4_scales(target, ok, st_enc)
    if RULE == 1 or RULE == 2:
        lo = (first & 0xFFFFFFFF).to(tl.uint32) + local.to(tl.uint32)
        bits = _element_bits(key, lo, (first >> 32).to(tl.uint32))
        if RULE == 2:
            codes, rounded = _e2m1_round(y, bits, True)
        else:
            codes, rounded = _e2m1_round(y, bits, False)
            stuck = ((rounded * scale[:, None]) * st_enc) == old
            chosen = stuck & ((bits >> 31) == 1)
            shift = tl.where(((bits >> 30) & 1) == 1, dither, -dither)
            dithered_codes, dithered = _e2m1_round(y + shift, bits, False)
            codes = tl.where(chosen, dithered_codes, codes)
            rounded = tl.where(chosen, dithered, rounded)
    else:
        codes, rounded = _e2m1_round(y, 0, False)
    new = (rounded * scale[:, None]) * st_enc

    tl.store(code_ptrs, _pack_codes(codes, BLOCK_B), mask=b_ok[:, None])
    tl.store(scale_ptrs, scale.to(tl.float8e4nv), mask=b_ok)
    tl.store(m_ptr + first + local, m, mask=ok)
    tl.store(v_ptr + first + local, v, mask=ok)
    err = tl.where(ok, target - new, 0.0)
    if RULE == 3:
        _store_rounded(r_ptr + first + local, err, ok)
    tl.store(flips_ptr + pid, tl.sum(tl.sum(((new != old) & ok).to(tl.int32), 1), 0))
    tl.store(sq_err_ptr + pid, tl.sum(tl.sum(err * err, 1), 0))
    tl.store(sq_norm_ptr + pid, tl.sum(tl.sum(tl.where(ok, target * target, 0.0), 1), 0))
    tl.store(sat_ptr + pid, tl.sum(((requested > E4M3_MAX) & b_ok).to(tl.int32), 0))


# ---------------------------------------------------------------------------------------------------------
# FP8 quantisers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _expert_of(rows, offsets_ptr, E, BLOCK_E: tl.constexpr):
    """Expert of each grouped row (offsets[e] = end of group e); E - 1 for rows past the last group."""
    es = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + es, mask=es < E, other=2147483647)
    return tl.minimum(tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), 1), E - 1)


@triton.jit
def _load_rows(x_ptr, rows, cols, ok, stride_xm, C, SWIGLU_INPUT: tl.constexpr, cs_rows, FOLD: tl.constexpr):
    """float32 tile of x[rows, cols], or of silu(x[:, cols]) * x[:, C + cols] rounded to x's dtype (the act the
    bf16 path would store) when x is a gate|up pre-activation; FOLD: times the column scales cs_rows[:, cols]
    (per-row pointers into a weight's scales, folded into this operand)."""
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    if SWIGLU_INPUT:
        gate = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(ptrs + C, mask=ok, other=0.0).to(tl.float32)
        x = _rounded_for(x_ptr, _silu_mul(gate, up))
    else:
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    if FOLD:
        x = x * tl.load(cs_rows[:, None] + cols[None, :], mask=ok, other=0.0)
    return x


@triton.jit
def _row_part(
    x_ptr, rows, row_ok, c0, WIDTH: tl.constexpr, stride_xm, C, SWIGLU_INPUT: tl.constexpr, cs_rows, FOLD: tl.constexpr
):  # fmt: skip
    """(float32 tile of columns [c0, c0 + WIDTH) of x's rows, its column indices, its mask)."""
    cols = c0 + tl.arange(0, WIDTH)
    ok = row_ok[:, None] & (cols < C)[None, :]
    return _load_rows(x_ptr, rows, cols, ok, stride_xm, C, SWIGLU_INPUT, cs_rows, FOLD), cols, ok


@triton.jit
def _store_row_part(q_ptr, rows64, cols, ok, x, scale, stride_qm):
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], _to_fp8(x, scale[:, None]), mask=ok)


@triton.jit
def fp8_quant_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    cs_ptr,
    offsets_ptr,
    M,
    C,
    E,
    stride_xm,
    stride_qm,
    stride_sm,
    stride_cse,
    SWIGLU_INPUT: tl.constexpr,
    BLOCKWISE: tl.constexpr,
    ONE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PART1: tl.constexpr = 0,
    PART2: tl.constexpr = 0,
    PART3: tl.constexpr = 0,
    FOLD: tl.constexpr = False,
    BLOCK_E: tl.constexpr = 1,
):
    """x[M,C] -> q[M,C] e4m3 with one scale per row (s[M]) or per row and 128 columns (s[M, C/128], BLOCK_C=128).

    Rowwise with ONE_PASS: each row is read once and kept in registers as up to four power-of-two column parts
    (BLOCK_C, PART1, PART2, PART3: 704 = 512 + 128 + 64 without masked lanes); else read twice (amax, then
    quantise) in BLOCK_C-column pieces. FOLD (rowwise, rows grouped by offsets[E]): quantise x[r, c] * cs[e(r), c]
    instead, a weight's scales along this GEMM's reduction folded into its left operand.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cs_rows = cs_ptr
    if FOLD:
        cs_rows = cs_ptr + _expert_of(rows, offsets_ptr, E, BLOCK_E).to(tl.int64) * stride_cse
    if BLOCKWISE:
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        x = _load_rows(x_ptr, rows, cols, ok, stride_xm, C, SWIGLU_INPUT, cs_rows, False)
        scale = _fp8_scale(tl.max(tl.abs(x), 1))
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], _to_fp8(x, scale[:, None]), mask=ok)
        tl.store(s_ptr + rows64 * stride_sm + tl.program_id(1), scale, mask=row_ok)
    elif ONE_PASS:
        x0, cols0, ok0 = _row_part(x_ptr, rows, row_ok, 0, BLOCK_C, stride_xm, C, SWIGLU_INPUT, cs_rows, FOLD)
        amax = tl.max(tl.abs(x0), 1)
        if PART1 > 0:
            x1, cols1, ok1 = _row_part(x_ptr, rows, row_ok, BLOCK_C, PART1, stride_xm, C, SWIGLU_INPUT, cs_rows, FOLD)
            amax = tl.maximum(amax, tl.max(tl.abs(x1), 1))
        if PART2 > 0:
            x2, cols2, ok2 = _row_part(
                x_ptr, rows, row_ok, BLOCK_C + PART1, PART2, stride_xm, C, SWIGLU_INPUT, cs_rows, FOLD
            )
            amax = tl.maximum(amax, tl.max(tl.abs(x2), 1))
        if PART3 > 0:
            c3 = BLOCK_C + PART1 + PART2
            x3, cols3, ok3 = _row_part(x_ptr, rows, row_ok, c3, PART3, stride_xm, C, SWIGLU_INPUT, cs_rows, FOLD)
            amax = tl.maximum(amax, tl.max(tl.abs(x3), 1))
        scale = _fp8_scale(amax)
        _store_row_part(q_ptr, rows64, cols0, ok0, x0, scale, stride_qm)
        if PART1 > 0:
            _store_row_part(q_ptr, rows64, cols1, ok1, x1, scale, stride_qm)
        if PART2 > 0:
            _store_row_part(q_ptr, rows64, cols2, ok2, x2, scale, stride_qm)
        if PART3 > 0:
            _store_row_part(q_ptr, rows64, cols3, ok3, x3, scale, stride_qm)
        tl.store(s_ptr + rows64 * stride_sm, scale, mask=row_ok)
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < C)[None, :]
            x = _load_rows(x_ptr, rows, cols, ok, stride_xm, C, SWIGLU_INPUT, cs_rows, FOLD)
            amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
        scale = _fp8_scale(amax)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < C)[None, :]
            x = _load_rows(x_ptr, rows, cols, ok, stride_xm, C, SWIGLU_INPUT, cs_rows, FOLD)
            tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], _to_fp8(x, scale[:, None]), mask=ok)
        tl.store(s_ptr + rows64 * stride_sm, scale, mask=row_ok)


@triton.jit
def _swiglu_bwd_part(
    dact_ptr, pre_ptr, dpre_ptr, rows64, live, row_ok, weight, c0, WIDTH: tl.constexpr, H, stride_dm, stride_pm,
    stride_dpm, WEIGHTED: tl.constexpr, cs_rows, FOLD: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    """Columns [c0, c0 + WIDTH) of the SwiGLU backward of the rows (zeros for rows not live): (d_gate, d_up rounded
    to d_pre's dtype and stored there, times the column scales cs_rows[:, col] when FOLD (the values to quantise),
    their column indices, store mask, row amax over both, row partial <d_act, act> (0 unless WEIGHTED))."""
    cols = c0 + tl.arange(0, WIDTH)
    col_ok = (cols < H)[None, :]
    ok = row_ok[:, None] & col_ok
    read = live[:, None] & col_ok
    d = tl.load(dact_ptr + rows64[:, None] * stride_dm + cols[None, :], mask=read, other=0.0).to(tl.float32)
    p = pre_ptr + rows64[:, None] * stride_pm + cols[None, :]
    gate = tl.load(p, mask=read, other=0.0).to(tl.float32)
    up = tl.load(p + H, mask=read, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dw = tl.zeros_like(weight)
    if WEIGHTED:
        act = tl.where(read, _rounded_for(pre_ptr, silu * up), 0.0)  # the act the forward stored
        dw = tl.sum(d * act, 1)
        d = d * weight[:, None]
    d_gate = _rounded_for(dpre_ptr, d * up * sig * (1.0 + gate * (1.0 - sig)))
    d_up = _rounded_for(dpre_ptr, d * silu)
    if STORE:
        out = dpre_ptr + rows64[:, None] * stride_dpm + cols[None, :]
        tl.store(out, d_gate.to(dpre_ptr.dtype.element_ty), mask=ok)
        tl.store(out + H, d_up.to(dpre_ptr.dtype.element_ty), mask=ok)
    if FOLD:
        d_gate = d_gate * tl.load(cs_rows[:, None] + cols[None, :], mask=ok, other=0.0)
        d_up = d_up * tl.load(cs_rows[:, None] + H + cols[None, :], mask=ok, other=0.0)
    amax = tl.maximum(tl.max(tl.abs(d_gate), 1), tl.max(tl.abs(d_up), 1))
    return d_gate, d_up, cols, ok, amax, dw


@triton.jit
def _store_swiglu_part(q_ptr, rows64, cols, ok, d_gate, d_up, scale, H, stride_qm):
    q = q_ptr + rows64[:, None] * stride_qm + cols[None, :]
    tl.store(q, _to_fp8(d_gate, scale[:, None]), mask=ok)
    tl.store(q + H, _to_fp8(d_up, scale[:, None]), mask=ok)


@triton.jit
def swiglu_bwd_rows_kernel(
    dact_ptr,
    pre_ptr,
    dpre_ptr,
    q_ptr,
    s_ptr,
    wts_ptr,
    w_idx_ptr,
    dw_ptr,
    offsets_ptr,
    cs_ptr,
    M,
    H,
    E,
    stride_dm,
    stride_pm,
    stride_dpm,
    stride_qm,
    stride_cse,
    WEIGHTED: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PART1: tl.constexpr = 0,
    PART2: tl.constexpr = 0,
    PART3: tl.constexpr = 0,
    FOLD: tl.constexpr = False,
    BLOCK_E: tl.constexpr = 1,
    STORE: tl.constexpr = True,
):
    """The SwiGLU backward of grouped rows (the expert backward after its plain dgrad GEMM), for bf16 and fp8.

    d_act[M,H] float32 or bf16 (dL/d act; before the routing weight when WEIGHTED), pre[M,2H] -> d_pre[M,2H] = [d_gate |
    d_up] in its dtype; QUANTIZE: also q[M,2H] e4m3 of the stored values with one scale per row s[M]; WEIGHTED:
    the rows' routing weights wts[w_idx[r]] scale d_act and dw[w_idx[r]] = <d_act[r], act[r]>. Rows past
    offsets[E-1] (dropped slots; d_act there is never written) get zeros, and no dw. A row's H columns sit in
    registers as up to four power-of-two parts (a whole row is needed for its scale). FOLD (with QUANTIZE): q holds
    d_pre[r, c] * cs[e(r), c] instead, the up weight's forward column scales folded in (its dgrad GEMM then reads
    the forward's codes with unit scales). STORE False (with QUANTIZE): the codes only (d_pre values are rounded
    to the dtype of dpre_ptr, which is then only a dtype carrier).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    live = rows < tl.load(offsets_ptr + E - 1)
    rows64 = rows.to(tl.int64)
    weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w_idx = rows
    if WEIGHTED:
        w_idx = tl.load(w_idx_ptr + rows, mask=live, other=0)
        weight = tl.load(wts_ptr + w_idx, mask=live, other=0.0).to(tl.float32)
    cs_rows = cs_ptr
    if FOLD:
        cs_rows = cs_ptr + _expert_of(rows, offsets_ptr, E, BLOCK_E).to(tl.int64) * stride_cse
    args = (dact_ptr, pre_ptr, dpre_ptr, rows64, live, row_ok, weight)
    strides = (H, stride_dm, stride_pm, stride_dpm, WEIGHTED)
    g0, u0, cols0, ok0, amax, dw = _swiglu_bwd_part(*args, 0, BLOCK_C, *strides, cs_rows, FOLD, STORE)
    if PART1 > 0:
        g1, u1, cols1, ok1, amax1, dw1 = _swiglu_bwd_part(*args, BLOCK_C, PART1, *strides, cs_rows, FOLD, STORE)
        amax, dw = tl.maximum(amax, amax1), dw + dw1
    if PART2 > 0:
        g2, u2, cols2, ok2, amax2, dw2 = _swiglu_bwd_part(*args, BLOCK_C + PART1, PART2, *strides, cs_rows, FOLD, STORE)
        amax, dw = tl.maximum(amax, amax2), dw + dw2
    if PART3 > 0:
        g3, u3, cols3, ok3, amax3, dw3 = _swiglu_bwd_part(
            *args, BLOCK_C + PART1 + PART2, PART3, *strides, cs_rows, FOLD, STORE
        )
        amax, dw = tl.maximum(amax, amax3), dw + dw3
    if QUANTIZE:
        scale = _fp8_scale(amax)
        _store_swiglu_part(q_ptr, rows64, cols0, ok0, g0, u0, scale, H, stride_qm)
        if PART1 > 0:
            _store_swiglu_part(q_ptr, rows64, cols1, ok1, g1, u1, scale, H, stride_qm)
        if PART2 > 0:
            _store_swiglu_part(q_ptr, rows64, cols2, ok2, g2, u2, scale, H, stride_qm)
        if PART3 > 0:
            _store_swiglu_part(q_ptr, rows64, cols3, ok3, g3, u3, scale, H, stride_qm)
        tl.store(s_ptr + rows64, scale, mask=row_ok)
    if WEIGHTED:
        tl.store(dw_ptr + w_idx, dw, mask=live)


@triton.jit
def _slab_part(w_base, r0, HEIGHT: tl.constexpr, R, col_ok, stride_wr):
    """(float32 rows [r0, r0 + HEIGHT) of a weight slab, their row indices, the mask)."""
    rs = r0 + tl.arange(0, HEIGHT)
    ok = (rs < R)[:, None] & col_ok[None, :]
    return tl.load(w_base + rs[:, None].to(tl.int64) * stride_wr, mask=ok, other=0.0).to(tl.float32), rs, ok


@triton.jit
def _store_slab_part(q_base, rs, ok, w, scale, stride_qr):
    tl.store(q_base + rs[:, None].to(tl.int64) * stride_qr, _to_fp8(w, scale[None, :]), mask=ok)


@triton.jit
def fp8_quant_weight_rowwise_kernel(
    w_ptr,
    q_ptr,
    q2_ptr,
    s_ptr,
    R,
    C,
    stride_we,
    stride_wr,
    stride_wc,
    stride_qe,
    stride_qr,
    stride_qc,
    stride_se,
    ONE_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PART1: tl.constexpr = 0,
    PART2: tl.constexpr = 0,
    PART3: tl.constexpr = 0,
    BOTH: tl.constexpr = False,
):
    """w[e] viewed as [R,C] -> q (any strides) with one scale per column c over all R (s[e, c]).

    ONE_PASS: the [R, BLOCK_C] slab is read once and kept in registers as up to four power-of-two row parts
    (BLOCK_R, PART1, PART2, PART3); else read twice in BLOCK_R-row pieces. BOTH (one pass, one part, R and C
    multiples of 4): q is [E,C,R] contiguous and q2 [E,R,C] contiguous gets the same codes (else q2 is unused),
    both stored as int32 words of four (see _transpose_words). The column blocks are the fastest grid axis: programs running together
    read neighbouring pieces of the same rows.
    """
    e = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w_base = w_ptr + e * stride_we + cols[None, :] * stride_wc
    q_base = q_ptr + e * stride_qe + cols[None, :] * stride_qc
    if BOTH:
        w0, rs0, ok0 = _slab_part(w_base, 0, BLOCK_R, R, col_ok, stride_wr)
        scale = _fp8_scale(tl.max(tl.abs(w0), 0))
        codes = _to_fp8(w0, scale[None, :]).to(tl.uint8, bitcast=True).to(tl.int32)  # [BLOCK_R, BLOCK_C]
        words = tl.program_id(0) * (BLOCK_C // 4) + tl.arange(0, BLOCK_C // 4)  # along C
        q2 = q2_ptr + e * (R * C // 4) + rs0[:, None].to(tl.int64) * (C // 4) + words[None, :]
        tl.store(q2, _pack_words(codes, BLOCK_R, BLOCK_C), mask=(rs0 < R)[:, None] & (words < C // 4)[None, :])
        slots = tl.arange(0, BLOCK_R // 4)  # along R
        qt = q_ptr + e * (R * C // 4) + cols[:, None].to(tl.int64) * (R // 4) + slots[None, :]
        tl.store(qt, _pack_words(tl.trans(codes), BLOCK_C, BLOCK_R), mask=col_ok[:, None] & (slots < R // 4)[None, :])
    elif ONE_PASS:
        w0, rs0, ok0 = _slab_part(w_base, 0, BLOCK_R, R, col_ok, stride_wr)
        amax = tl.max(tl.abs(w0), 0)
        if PART1 > 0:
            w1, rs1, ok1 = _slab_part(w_base, BLOCK_R, PART1, R, col_ok, stride_wr)
            amax = tl.maximum(amax, tl.max(tl.abs(w1), 0))
        if PART2 > 0:
            w2, rs2, ok2 = _slab_part(w_base, BLOCK_R + PART1, PART2, R, col_ok, stride_wr)
            amax = tl.maximum(amax, tl.max(tl.abs(w2), 0))
        if PART3 > 0:
            w3, rs3, ok3 = _slab_part(w_base, BLOCK_R + PART1 + PART2, PART3, R, col_ok, stride_wr)
            amax = tl.maximum(amax, tl.max(tl.abs(w3), 0))
        scale = _fp8_scale(amax)
        _store_slab_part(q_base, rs0, ok0, w0, scale, stride_qr)
        if PART1 > 0:
            _store_slab_part(q_base, rs1, ok1, w1, scale, stride_qr)
        if PART2 > 0:
            _store_slab_part(q_base, rs2, ok2, w2, scale, stride_qr)
        if PART3 > 0:
            _store_slab_part(q_base, rs3, ok3, w3, scale, stride_qr)
    else:
        amax = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            amax = tl.maximum(amax, tl.max(tl.abs(_slab_part(w_base, r0, BLOCK_R, R, col_ok, stride_wr)[0]), 0))
        scale = _fp8_scale(amax)
        for r0 in range(0, R, BLOCK_R):
            w, rs, ok = _slab_part(w_base, r0, BLOCK_R, R, col_ok, stride_wr)
            _store_slab_part(q_base, rs, ok, w, scale, stride_qr)
    tl.store(s_ptr + e * stride_se + cols, scale, mask=col_ok)


@triton.jit
def fp8_quant_weight_blockwise_kernel(
    w_ptr,
    q_ptr,
    qt_ptr,
    s_ptr,
    K,
    N,
    stride_we,
    stride_wk,
    stride_wn,
    WRITE_Q: tl.constexpr,
    WRITE_QT: tl.constexpr,
):
    """w[E,K,N] -> 128x128-tile e4m3: q[E,K,N] and/or qt[E,N,K] (contiguous), scales s[E, K/128, N/128]."""
    e = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    nb = tl.program_id(2)
    ks = kb * FP8_BLOCK + tl.arange(0, FP8_BLOCK)
    ns = nb * FP8_BLOCK + tl.arange(0, FP8_BLOCK)
    ok = (ks < K)[:, None] & (ns < N)[None, :]
    w = tl.load(w_ptr + e * stride_we + ks[:, None] * stride_wk + ns[None, :] * stride_wn, mask=ok, other=0.0)
    w = w.to(tl.float32)
    scale = _fp8_scale(tl.max(tl.max(tl.abs(w), 1), 0))
    q = _to_fp8(w, scale)
    if WRITE_Q:
        tl.store(q_ptr + e * K * N + ks[:, None] * N + ns[None, :], q, mask=ok)
    if WRITE_QT:
        tl.store(qt_ptr + e * K * N + ns[None, :] * K + ks[:, None], q, mask=ok)
    tl.store(s_ptr + (e * tl.num_programs(1) + kb) * tl.num_programs(2) + nb, scale)


@triton.jit
def revive_dead_slices_kernel(s_ptr, S, BLOCK_S: tl.constexpr):
    """In place over rowwise weight scales s[E,S], one program per expert: an all-zero slice's scale (ZERO_SLICE_SCALE)
    becomes the largest of its expert, or 1 when every slice is zero (reference_lowprec.revive_dead_slices)."""
    ptrs = s_ptr + tl.program_id(0).to(tl.int64) * S + tl.arange(0, BLOCK_S)
    ok = tl.arange(0, BLOCK_S) < S
    s = tl.load(ptrs, mask=ok, other=ZERO_SLICE_SCALE)
    top = tl.max(s, 0)
    top = tl.where(top == ZERO_SLICE_SCALE, 1.0, top)
    tl.store(ptrs, tl.where(s == ZERO_SLICE_SCALE, top, s), mask=ok)


@triton.jit
def _byte(words, j: tl.constexpr):
    """Byte j of int32 words, as int32 values 0-255."""
    return (words >> (8 * j)) & 0xFF


@triton.jit
def _quad_words(c0, c1, c2, c3):
    """int32 byte values of four rows 4g + i (i = 0-3), same shape -> words with row 4g + i's code in byte i."""
    return c0 | (c1 << 8) | (c2 << 16) | (c3 << 24)


@triton.jit
def _load_quads(base, rows, rows_end, word_ok, stride_words):
    """int32 words [G, W] of rows r + i (i = 0-3) of a byte matrix, for rows r [G] (4g apart) and the column words
    at base (zeros past rows_end)."""
    w0 = tl.load(base + rows[:, None].to(tl.int64) * stride_words, mask=(rows < rows_end)[:, None] & word_ok, other=0)
    r1, r2, r3 = rows + 1, rows + 2, rows + 3
    w1 = tl.load(base + r1[:, None].to(tl.int64) * stride_words, mask=(r1 < rows_end)[:, None] & word_ok, other=0)
    w2 = tl.load(base + r2[:, None].to(tl.int64) * stride_words, mask=(r2 < rows_end)[:, None] & word_ok, other=0)
    w3 = tl.load(base + r3[:, None].to(tl.int64) * stride_words, mask=(r3 < rows_end)[:, None] & word_ok, other=0)
    return w0, w1, w2, w3


@triton.jit
def _store_quads_transposed(out_ptr, w0, w1, w2, w3, words, n_cols, slots, slot_ok, stride_out_words):
    """The codes of four row-interleaved word tiles w_i [G, W] (rows 4g + i; column words `words` [W]) stored
    transposed: output row 4w + j (j = 0-3, below n_cols) gets, at word slots[g], byte j of w0..w3.

    Transposing packed bytes this way moves words, never single bytes: four elementwise byte gathers and an int32
    transpose per output row set. Against _transpose_words (every word unpacked to four int32 values, one transpose
    of them all) it took the dW column requantisation from 0.136 to 0.104 ms and the grouped transposes 10-20% off on
    moonlet (H100); the [E,K,N] weight transpose stays on _transpose_words, which was 6x faster there.
    """
    for j in tl.static_range(4):
        cols = 4 * words + j
        out = tl.trans(_quad_words(_byte(w0, j), _byte(w1, j), _byte(w2, j), _byte(w3, j)))
        ptrs = out_ptr + cols[:, None].to(tl.int64) * stride_out_words + slots[None, :]
        tl.store(ptrs, out, mask=(cols < n_cols)[:, None] & slot_ok[None, :])


@triton.jit
def _transpose_words(words, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 words [BLOCK_K, BLOCK_N/4] of four codes each along N -> words [BLOCK_N, BLOCK_K/4] along K.

    Storing one 8-bit tile in a second layout miscompiled on sm_90 (Triton 3.6), so the codes are unpacked to
    int32, transposed as int32 and packed again: every layout change is on 32-bit values.
    """
    b0, b1 = words & 0xFF, (words >> 8) & 0xFF
    b2, b3 = (words >> 16) & 0xFF, (words >> 24) & 0xFF
    codes = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BLOCK_K, BLOCK_N))  # [k, 4c + j] = byte j
    return _pack_words(tl.trans(codes), BLOCK_N, BLOCK_K)


@triton.jit
def _pack_words(codes, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 byte values [ROWS, COLS] -> int32 words [ROWS, COLS/4], byte j of word g = codes[:, 4g + j]."""
    t = tl.reshape(codes, (ROWS, COLS // 4, 2, 2))  # [n, g, a, b] = code at column 4g + 2a + b
    even, odd = tl.split(t)  # b = 0, 1
    c0, c2 = tl.split(even)  # a = 0, 1
    c1, c3 = tl.split(odd)
    return c0 | (c1 << 8) | (c2 << 16) | (c3 << 24)


@triton.jit
def fp8_transpose_kernel(q_ptr, qt_ptr, K, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """e4m3 codes q[E,K,N] -> qt[E,N,K], both read and written as int32 words of four codes (K, N multiples of 4)."""
    e = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cs = tl.program_id(2) * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)  # input words along N
    ok = (ks < K)[:, None] & (cs < N // 4)[None, :]
    words = tl.load(q_ptr + e * (K * N // 4) + ks[:, None].to(tl.int64) * (N // 4) + cs[None, :], mask=ok, other=0)
    out = _transpose_words(words, BLOCK_K, BLOCK_N)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    gs = tl.program_id(1) * (BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)  # output words along K
    ok_t = (ns < N)[:, None] & (gs < K // 4)[None, :]
    tl.store(qt_ptr + e * (K * N // 4) + ns[:, None].to(tl.int64) * (K // 4) + gs[None, :], out, mask=ok_t)


@triton.jit
def fp8_transpose_grouped_kernel(
    q_ptr, qt_ptr, offsets_ptr, M, C, E, stride_qt_words, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr
):
    """Grouped rows of e4m3 codes q[M,C] -> qt[C, chunk*128 + r] in the dW operands' chunk layout (see
    fp8_quant_grouped_cols_kernel; rows past a group's end are zeros), as int32 words (C a multiple of 4)."""
    tiles_c = tl.cdiv(C, BLOCK_C)
    chunk = tl.program_id(0) // tiles_c
    c0 = (tl.program_id(0) % tiles_c) * BLOCK_C
    _, row0, end, is_tail = _locate_tile(chunk, offsets_ptr, M, E, FP8_BLOCK, BLOCK_E)
    if is_tail:
        return
    quads = row0 + 4 * tl.arange(0, FP8_BLOCK // 4)
    words = c0 // 4 + tl.arange(0, BLOCK_C // 4)  # input words along C
    w0, w1, w2, w3 = _load_quads(q_ptr + words[None, :], quads, end, (words < C // 4)[None, :], C // 4)
    slots = chunk.to(tl.int64) * (FP8_BLOCK // 4) + tl.arange(0, FP8_BLOCK // 4)  # output words along the slots
    _store_quads_transposed(qt_ptr, w0, w1, w2, w3, words, C, slots, slots >= 0, stride_qt_words)


@triton.jit
def _row_factor(rows, row_ok, src, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, X_SCALES: tl.constexpr, MULT: tl.constexpr,
                WEIGHTED: tl.constexpr):  # fmt: skip
    """float32 multiplier of grouped rows: ((xs[src[r]] if X_SCALES) * mult[r] if MULT) * wts[w_idx[r]] if WEIGHTED
    (1 when none), in that order, so that a row's values and the per-token maximum agree bit for bit."""
    f = tl.full(rows.shape, 1.0, tl.float32)
    if X_SCALES:
        f = tl.load(xs_ptr + src, mask=row_ok, other=0.0)
    if MULT:
        f = f * tl.load(mult_ptr + rows, mask=row_ok, other=0.0)
    if WEIGHTED:
        w_idx = tl.load(w_idx_ptr + rows, mask=row_ok, other=0)
        f = f * tl.load(wts_ptr + w_idx, mask=row_ok, other=0.0).to(tl.float32)
    return f


@triton.jit
def _dw_cols_tile(x_ptr, idx_ptr, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, rows, row_ok, cols, col_ok, stride_xm,
                  GATHER: tl.constexpr, X_SCALES: tl.constexpr, MULT: tl.constexpr,
                  WEIGHTED: tl.constexpr):  # fmt: skip
    """float32 tile of grouped rows: x[idx[r]] (GATHER; x may be e4m3 codes with row scales xs when X_SCALES) times
    the row's _row_factor."""
    src = rows
    if GATHER:
        src = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if X_SCALES or MULT or WEIGHTED:
        f = _row_factor(rows, row_ok, src, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, X_SCALES, MULT, WEIGHTED)
        x = x * f[:, None]
    return x


@triton.jit
def _dw_cols_codes(x_ptr, idx_ptr, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, rows, end, cols, col_ok, stride_xm, scale,
                   GATHER: tl.constexpr, X_SCALES: tl.constexpr, MULT: tl.constexpr,
                   WEIGHTED: tl.constexpr):  # fmt: skip
    """e4m3 codes (int32 values 0-255) of the _dw_cols_tile of rows (below end) under the column scales."""
    x = _dw_cols_tile(x_ptr, idx_ptr, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, rows, rows < end, cols, col_ok,
                      stride_xm, GATHER, X_SCALES, MULT, WEIGHTED)  # fmt: skip
    return _to_fp8(x, scale[None, :]).to(tl.uint8, bitcast=True).to(tl.int32)


@triton.jit
def fp8_quant_dw_cols_kernel(
    x_ptr,
    idx_ptr,
    xs_ptr,
    mult_ptr,
    wts_ptr,
    w_idx_ptr,
    qt_ptr,
    s_ptr,
    amax_ptr,
    offsets_ptr,
    M,
    C,
    E,
    stride_xm,
    stride_qt_words,
    GATHER: tl.constexpr,
    X_SCALES: tl.constexpr,
    MULT: tl.constexpr,
    WEIGHTED: tl.constexpr,
    PHASE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
    TOP_K: tl.constexpr = 0,
):
    """Grouped rows (see _dw_cols_tile) -> transposed e4m3 qt[C, chunk*128 + r] in the chunk layout of
    fp8_quant_grouped_cols_kernel and scales s[E, C]: one per column, shared by the experts, so the dW GEMM
    accumulates codes only. One program per (128-row chunk, column block): PHASE 1 atomically maxes the chunk's
    column amax into amax[C] (float32 bits as int32, zero-filled); PHASE 2 quantises with it and stores the codes
    transposed, as int32 words of four rows 4g..4g+3 per column (see _quad_words), the expert's first chunk its
    scales, and program column block c of chunk e < E the zero-slice scale of expert e if it is empty (it has no
    chunk). Routed (TOP_K > 0, launched as PHASE 1 only): the amax is taken over x's M token rows in 128-row pieces
    instead (offsets read for the routed end only), each token times the largest |_row_factor| of its grouped rows
    idx_ptr[t*TOP_K + k] (its pos; rows past offsets[-1] are dropped): a pass over the T tokens instead of the T*K
    grouped rows."""
    tiles_c = tl.cdiv(C, BLOCK_C)
    chunk = tl.program_id(0) // tiles_c
    c0 = (tl.program_id(0) % tiles_c) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    at = amax_ptr + cols
    if TOP_K > 0:  # token rows, each times its largest row factor; the same products as PHASE 2's rows
        tokens = chunk * FP8_BLOCK + tl.arange(0, FP8_BLOCK)
        token_ok = tokens < M
        routed_end = tl.load(offsets_ptr + E - 1)
        f = tl.zeros((FP8_BLOCK,), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            rows = tl.load(idx_ptr + tokens * TOP_K + k, mask=token_ok, other=0)
            ok = token_ok & (rows < routed_end)
            fk = _row_factor(rows, ok, tokens, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, X_SCALES, MULT, WEIGHTED)
            f = tl.maximum(f, tl.where(ok, tl.abs(fk), 0.0))
        x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_xm + cols[None, :],
                    mask=token_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        tl.atomic_max(at, tl.max(tl.abs(x * f[:, None]), 0).to(tl.int32, bitcast=True), mask=col_ok)
        return
    if PHASE == 2 and chunk < E:  # an empty expert's scales (it has no chunk to write them)
        e_start = tl.where(chunk > 0, tl.load(offsets_ptr + tl.maximum(chunk - 1, 0)), 0)
        if tl.load(offsets_ptr + chunk) == e_start:
            tl.store(s_ptr + chunk.to(tl.int64) * C + cols, tl.full((BLOCK_C,), ZERO_SLICE_SCALE, tl.float32),
                     mask=col_ok)  # fmt: skip
    expert, row0, end, is_tail = _locate_tile(chunk, offsets_ptr, M, E, FP8_BLOCK, BLOCK_E)
    if is_tail:
        return
    if PHASE == 1:  # non-negative float32 values order as their int32 bits
        rows = row0 + tl.arange(0, FP8_BLOCK)
        x = _dw_cols_tile(x_ptr, idx_ptr, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, rows, rows < end, cols, col_ok,
                          stride_xm, GATHER, X_SCALES, MULT, WEIGHTED)  # fmt: skip
        tl.atomic_max(at, tl.max(tl.abs(x), 0).to(tl.int32, bitcast=True), mask=col_ok)
    else:
        scale = _fp8_scale(tl.load(at, mask=col_ok, other=0).to(tl.float32, bitcast=True))
        # rows 4g + i quantised as four tiles, so that a word of four rows is packed elementwise (see
        # _store_quads_transposed)
        quads = row0 + 4 * tl.arange(0, FP8_BLOCK // 4)
        words = _quad_words(
            _dw_cols_codes(x_ptr, idx_ptr, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, quads, end, cols, col_ok, stride_xm,
                           scale, GATHER, X_SCALES, MULT, WEIGHTED),
            _dw_cols_codes(x_ptr, idx_ptr, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, quads + 1, end, cols, col_ok,
                           stride_xm, scale, GATHER, X_SCALES, MULT, WEIGHTED),
            _dw_cols_codes(x_ptr, idx_ptr, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, quads + 2, end, cols, col_ok,
                           stride_xm, scale, GATHER, X_SCALES, MULT, WEIGHTED),
            _dw_cols_codes(x_ptr, idx_ptr, xs_ptr, mult_ptr, wts_ptr, w_idx_ptr, quads + 3, end, cols, col_ok,
                           stride_xm, scale, GATHER, X_SCALES, MULT, WEIGHTED),
        )  # fmt: skip
        slots = chunk.to(tl.int64) * (FP8_BLOCK // 4) + tl.arange(0, FP8_BLOCK // 4)
        ptrs = qt_ptr + cols[:, None].to(tl.int64) * stride_qt_words + slots[None, :]
        tl.store(ptrs, tl.trans(words), mask=col_ok[:, None])  # [column, word of four rows]
        start = tl.where(expert > 0, tl.load(offsets_ptr + tl.maximum(expert - 1, 0)), 0)
        if row0 == start:  # the expert's first chunk writes its scales
            tl.store(s_ptr + expert.to(tl.int64) * C + cols, scale, mask=col_ok)


@triton.jit
def fp8_quant_grouped_cols_kernel(
    x_ptr,
    qt_ptr,
    s_ptr,
    offsets_ptr,
    M,
    C,
    E,
    stride_xm,
    stride_qt,
    SWIGLU_INPUT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """x[M,C] grouped by offsets -> transposed qt[C, chunk*128 + r] (zero-padded) and scales s[chunk, C].

    Chunks are the grouped GEMM's 128-row tiles (a tile never crosses a group; tail tiles are skipped).
    Each chunk gets its own 128-aligned column slot, so the dW kernel reads aligned, unmasked tiles.
    """
    tiles_c = tl.cdiv(C, BLOCK_C)
    chunk = tl.program_id(0) // tiles_c
    cols = (tl.program_id(0) % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    _, row0, end, is_tail = _locate_tile(chunk, offsets_ptr, M, E, FP8_BLOCK, BLOCK_E)
    if is_tail:
        return
    r = tl.arange(0, FP8_BLOCK)
    col_ok = cols < C
    ok = (row0 + r < end)[:, None] & col_ok[None, :]
    x = _load_rows(x_ptr, row0 + r, cols, ok, stride_xm, C, SWIGLU_INPUT, x_ptr, False)
    scale = _fp8_scale(tl.max(tl.abs(x), 0))
    slot = chunk.to(tl.int64) * FP8_BLOCK + r
    tl.store(
        qt_ptr + cols[None, :].to(tl.int64) * stride_qt + slot[:, None],
        _to_fp8(x, scale[None, :]),
        mask=col_ok[None, :],
    )
    tl.store(s_ptr + chunk.to(tl.int64) * C + cols, scale, mask=col_ok)


# ---------------------------------------------------------------------------------------------------------
# FP8 grouped GEMM
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _dot_fp8(a, b, acc, UPCAST: tl.constexpr, PROMOTE_EVERY: tl.constexpr):
    """acc + a @ b on e4m3 operands; the fp32 promotion interval bounds Hopper's reduced-precision accumulation
    (0: never promoted, the wgmma accumulator is acc itself, "fast accumulation")."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if PROMOTE_EVERY == 0:
        return tl.dot(a, b, acc)
    return tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE_EVERY)


@triton.jit
def _up_tile(
    b_ptr,
    b_ptrs,
    up_off,
    k_ok,
    col_ok,
    e32,
    up_col0,
    k0,
    TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """[BLOCK_K, BLOCK_N] tile of the up half of B (columns N + col0 ...), by TMA or masked pointer load."""
    if TMA:
        tile = tl.trans(b_ptr.load([e32, up_col0, k0]).reshape(BLOCK_N, BLOCK_K))
    else:
        tile = tl.load(b_ptrs + up_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    return tile


@triton.jit
def gmm_fp8_kernel(
    a_ptr,
    sa_ptr,
    b_ptr,
    sb_ptr,
    c_ptr,
    h_ptr,
    q_ptr,
    sq_ptr,
    offsets_ptr,
    a_idx_ptr,
    wts_ptr,
    w_idx_ptr,
    dw_ptr,
    M,
    N,
    K,
    E,
    stride_am,
    stride_sam,
    stride_sak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_sbe,
    stride_sbk,
    stride_sbn,
    stride_cm,
    stride_hm,
    BLOCKWISE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    UPCAST: tl.constexpr,
    FAST_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    TMA: tl.constexpr = False,
    GATHER_A: tl.constexpr = False,
    WEIGHTED: tl.constexpr = False,
):
    """Grouped C[rows of e] = (A[rows] @ B[e]) on e4m3 operands with float32 scales; A is K-contiguous.

    Scales: rowwise -> sa[row], sb[e, col] applied once after the K loop; blockwise -> sa[row, k/128] and
    sb[e, k/128, col/128], applied to each BLOCK_K partial product (BLOCK_K divides 128). The B strides
    (expert, reduction, output column) let one kernel serve forward (B = w^T copy) and dgrad (B = w).
    Tail tiles (rows >= offsets[-1]) store zeros.
    GATHER_A: grouped row r reads A's (and its scales') row a_idx[r] (tokens in token order, quantised once).
    WEIGHTED (EPILOGUE_SWIGLU_BWD): A @ B is dL/d(act) before the routing weight wts[w_idx[r]]; the tile's partial
    of that weight's gradient, <A @ B, act>, goes to dw[pid_n, w_idx[r]] (summed over column tiles by the caller).
    TMA: a_ptr is a descriptor of A[M,K] (block [BLOCK_M, BLOCK_K]) and b_ptr one of B stored [E, out, K]
    (block [1, BLOCK_N, BLOCK_K]); rows past a tile's group and columns past N read other data (or TMA's zero
    fill past the tensor), which only reaches outputs the masked stores drop.
    """
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    expert, row0, end, is_tail = _locate_tile(pid_m, offsets_ptr, M, E, BLOCK_M, BLOCK_E)
    if row0 >= end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    rows64 = rows.to(tl.int64)
    if GATHER_A:
        a_rows = tl.load(a_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rows64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    e64 = tl.where(is_tail, 0, expert).to(tl.int64)  # tail tiles (expert == E) read no weight, but valid scales
    a_ptrs, b_ptrs = a_ptr, b_ptr  # the descriptors themselves under TMA
    if not TMA:
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
        b_ptrs = b_ptr + e64 * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    up_off = N * stride_bn
    e32 = e64.to(tl.int32)
    col0 = pid_n * BLOCK_N
    sa_ptrs = sa_ptr + a_rows * stride_sam
    if BLOCKWISE:
        sb_ptrs = sb_ptr + e64 * stride_sbe + (cols // FP8_BLOCK) * stride_sbn
        sb_up_ptrs = sb_ptr + e64 * stride_sbe + ((cols + N) // FP8_BLOCK) * stride_sbn
    else:
        sb_ptrs = sb_ptr + e64 * stride_sbe + cols * stride_sbn
        sb_up_ptrs = sb_ptrs + N * stride_sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(is_tail, 0, K)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = (k0 + ks) < K
        if TMA:
            a = a_ptr.load([row0, k0])
            b = tl.trans(b_ptr.load([e32, col0, k0]).reshape(BLOCK_N, BLOCK_K))
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if BLOCKWISE:
            kb = k0 // FP8_BLOCK
            sa = tl.load(sa_ptrs + kb * stride_sak, mask=row_ok, other=0.0)
            sb = tl.load(sb_ptrs + kb * stride_sbk, mask=col_ok, other=0.0)
            zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc += _dot_fp8(a, b, zero, UPCAST, BLOCK_K) * (sa[:, None] * sb[None, :])
            if EPILOGUE == 1 or EPILOGUE == 3:
                b_up = _up_tile(b_ptr, b_ptrs, up_off, k_ok, col_ok, e32, col0 + N, k0, TMA, BLOCK_N, BLOCK_K)
                sb_up = tl.load(sb_up_ptrs + kb * stride_sbk, mask=col_ok, other=0.0)
                acc_up += _dot_fp8(a, b_up, zero, UPCAST, BLOCK_K) * (sa[:, None] * sb_up[None, :])
        else:
            acc = _dot_fp8(a, b, acc, UPCAST, 0 if FAST_ACC else BLOCK_K)
            if EPILOGUE == 1 or EPILOGUE == 3:
                b_up = _up_tile(b_ptr, b_ptrs, up_off, k_ok, col_ok, e32, col0 + N, k0, TMA, BLOCK_N, BLOCK_K)
                acc_up = _dot_fp8(a, b_up, acc_up, UPCAST, 0 if FAST_ACC else BLOCK_K)
        if not TMA:
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
    if not BLOCKWISE:
        sa = tl.load(sa_ptrs, mask=row_ok, other=0.0)
        acc = acc * sa[:, None] * tl.load(sb_ptrs, mask=col_ok, other=0.0)[None, :]
        if EPILOGUE == 1 or EPILOGUE == 3:
            acc_up = acc_up * sa[:, None] * tl.load(sb_up_ptrs, mask=col_ok, other=0.0)[None, :]

    out_ok = row_ok[:, None] & col_ok[None, :]
    c_ptrs = c_ptr + rows64[:, None] * stride_cm + cols[None, :]
    if EPILOGUE == 0:
        _store_rounded(c_ptrs, acc, out_ok)
    elif EPILOGUE == 1:
        # pre-activation stored in its dtype; act from the stored (rounded) values, quantised per 128 columns
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
        gate = _rounded_for(h_ptr, acc)
        up = _rounded_for(h_ptr, acc_up)
        tl.store(h_ptrs, gate.to(h_ptr.dtype.element_ty), mask=out_ok)
        tl.store(h_ptrs + N, up.to(h_ptr.dtype.element_ty), mask=out_ok)
        act = tl.where(out_ok, _rounded_for(h_ptr, _silu_mul(gate, up)), 0.0)
        scale = _fp8_scale(tl.max(tl.abs(act), 1))
        tl.store(q_ptr + rows64[:, None] * N + cols[None, :], _to_fp8(act, scale[:, None]), mask=out_ok)
        tl.store(sq_ptr + rows64 * tl.cdiv(N, FP8_BLOCK) + pid_n, scale, mask=row_ok)
    elif EPILOGUE == 3:
        # pre-activation and act, both in H's dtype (act from the stored, rounded gate and up)
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
        gate = _rounded_for(h_ptr, acc)
        up = _rounded_for(h_ptr, acc_up)
        tl.store(h_ptrs, gate.to(h_ptr.dtype.element_ty), mask=out_ok)
        tl.store(h_ptrs + N, up.to(h_ptr.dtype.element_ty), mask=out_ok)
        _store_rounded(c_ptrs, _silu_mul(gate, up), out_ok)
    else:
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
        gate = tl.load(h_ptrs, mask=out_ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + N, mask=out_ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        if WEIGHTED:
            w_idx = tl.load(w_idx_ptr + rows, mask=row_ok, other=0)
            weight = tl.load(wts_ptr + w_idx, mask=row_ok, other=0.0).to(tl.float32)
            act = tl.where(out_ok, _rounded_for(h_ptr, silu * up), 0.0)  # the act the forward stored
            tl.store(dw_ptr + pid_n.to(tl.int64) * M + w_idx, tl.sum(acc * act, 1), mask=row_ok)
            acc = acc * weight[:, None]
        d_up = acc * silu
        d_gate = acc * up * sig * (1.0 + gate * (1.0 - sig))
        _store_rounded(c_ptrs, d_gate, out_ok)
        _store_rounded(c_ptrs + N, d_up, out_ok)


@triton.jit
def gmm_fp8_dw_kernel(
    a_ptr,
    sa_ptr,
    b_ptr,
    sb_ptr,
    out_ptr,
    offsets_ptr,
    KA,
    N,
    E,
    stride_a,
    stride_b,
    stride_oe,
    stride_ok,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    EXPERT_SCALES: tl.constexpr = False,
    FAST_ACC: tl.constexpr = False,
):
    """out[e] = A[rows of e]^T @ B[rows of e] from chunked transposed e4m3 copies a[KA, slot], b[N, slot].

    Slots as written by fp8_quant_grouped_cols_kernel (128 zero-padded columns per chunk). Scales sa[chunk, KA],
    sb[chunk, N]: BLOCK_M divides 128, so each partial product has one chunk's scales. EXPERT_SCALES: sa[E, KA],
    sb[E, N], applied once to the whole sum (promoted to float32 every BLOCK_M slots, or never with FAST_ACC).
    Empty groups store zeros.
    """
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(KA, BLOCK_KA)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_expert = tiles_k * tiles_n
    expert = pid // per_expert
    pid_k = (pid % per_expert) // tiles_n
    pid_n = pid % tiles_n
    e_idx = tl.arange(0, BLOCK_E)
    valid = e_idx < E
    ends = tl.load(offsets_ptr + e_idx, mask=valid, other=0)
    starts = tl.load(offsets_ptr + e_idx - 1, mask=valid & (e_idx > 0), other=0)
    chunks = tl.where(valid, (ends - starts + FP8_BLOCK - 1) // FP8_BLOCK, 0)
    first_chunk = tl.sum(tl.where(e_idx < expert, chunks, 0), 0)
    n_chunks = tl.sum(tl.where(e_idx == expert, chunks, 0), 0)
    kas = pid_k * BLOCK_KA + tl.arange(0, BLOCK_KA)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ka_ok = kas < KA
    col_ok = cols < N
    a_rows = a_ptr + kas[:, None].to(tl.int64) * stride_a
    b_cols = b_ptr + cols[None, :].to(tl.int64) * stride_b
    steps: tl.constexpr = FP8_BLOCK // BLOCK_M
    acc = tl.zeros((BLOCK_KA, BLOCK_N), dtype=tl.float32)
    for j in range(first_chunk * steps, (first_chunk + n_chunks) * steps):
        slot = tl.multiple_of(j * BLOCK_M, BLOCK_M) + tl.arange(0, BLOCK_M)
        a = tl.load(a_rows + slot[None, :], mask=ka_ok[:, None], other=0.0)
        b = tl.load(b_cols + slot[:, None], mask=col_ok[None, :], other=0.0)
        if EXPERT_SCALES:
            acc = _dot_fp8(a, b, acc, UPCAST, 0 if FAST_ACC else BLOCK_M)
        else:
            chunk = j // steps  # int32 is enough: chunks * max(KA, N) < 2^31
            sa = tl.load(sa_ptr + chunk * KA + kas, mask=ka_ok, other=0.0)
            sb = tl.load(sb_ptr + chunk * N + cols, mask=col_ok, other=0.0)
            zero = tl.zeros((BLOCK_KA, BLOCK_N), dtype=tl.float32)
            acc += _dot_fp8(a, b, zero, UPCAST, BLOCK_M) * (sa[:, None] * sb[None, :])
    if EXPERT_SCALES:  # acc first: a dead weight slice's 1 / scale (2^126) times 0 stays 0
        sa = tl.load(sa_ptr + expert * KA + kas, mask=ka_ok, other=0.0)
        sb = tl.load(sb_ptr + expert * N + cols, mask=col_ok, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + kas[:, None].to(tl.int64) * stride_ok + cols[None, :]
    _store_rounded(out_ptrs, acc, ka_ok[:, None] & col_ok[None, :])
