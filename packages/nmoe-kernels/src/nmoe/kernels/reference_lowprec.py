"""Plain-PyTorch reference for the low-precision ops: the CPU path and the oracle of every low-precision test.

Every float32 step is a single correctly rounded torch op (mul, add, sub, div; sqrt through float64, because
some CPU builds of torch round float32 sqrt to within 1 ulp only), so the Triton kernels, which do the same
steps with `div_rn` / `sqrt_rn` and without FMA contraction, agree with it bit for bit.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nmoe.kernels.reference import group_sizes, sort_by_expert

E4M3_MAX = 448.0
# the scale of an all-zero slice (codes all 0): the smallest normal float32, not 1, because a weight's scales can
# be folded into the other GEMM operand (expert_gemm), where a zero slice's scale must not set that row's amax
ZERO_SLICE_SCALE = 2.0**-126
# the smallest scale of a nonzero slice (not ZERO_SLICE_SCALE, which marks all-zero slices): scales stay normal,
# so 1 / scale is finite, and subnormal results of amax / 448 cannot differ between CPU and a flushing GPU
MIN_SCALE = 2.0**-125
E2M1_MAX = 6.0
NVFP4_BLOCK = 16  # elements per e4m3 block scale along the last dim
FP8_BLOCK = 128  # DeepSeek-V3 tiles: 1x128 for activations, 128x128 for weights, 128 rows for wgrad operands
NVFP4_SCALE_HEADROOM = 4.0  # the optimizer keeps every block scale <= 448 / 4 (see nvfp4_encode_scale)
SCALINGS = ("rowwise", "blockwise")
RULES = ("nearest", "seed", "stochastic", "residual")

# e2m1 code c (bit 3 sign, bits 2-1 exponent, bit 0 mantissa) -> value; code 8 (-0) decodes to 0 and is never emitted
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_MASK32 = 0xFFFFFFFF
_HASH_MUL1 = 0x21F0AAAD  # both multipliers < 2**31, so the int64 emulation below never overflows
_HASH_MUL2 = 0x735A2D97


def f32(x: float) -> float:
    """x rounded to the nearest float32 (the value a Triton kernel sees for a Python float argument)."""
    return struct.unpack("f", struct.pack("f", x))[0]


# ---------------------------------------------------------------------------------------------------------
# Code tables and rounding
# ---------------------------------------------------------------------------------------------------------


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """float32 y (already divided by its scale) -> e2m1 codes uint8 in [0,16), round to nearest even, saturating at ±6.

    Ties go to the even code (mantissa bit 0): 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
    Magnitudes that round to 0 get code 0 (never -0), so a code change is always a value change.
    """
    a = y.abs()
    code = (
        (a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0)
    ).to(torch.uint8)
    return code + 8 * ((y < 0) & (code > 0)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes uint8 -> float32 values (exact)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def e2m1_stochastic(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Unbiased stochastic rounding of float32 y onto the e2m1 grid with uniforms u in [0,1) -> codes uint8.

    Rounds |y| up to the next code with probability (|y| - lo) / (hi - lo); every step here is exact.
    """
    a = y.abs().clamp(max=E2M1_MAX)
    lo_code = (
        (a >= 0.5).to(torch.uint8) + (a >= 1.0) + (a >= 1.5) + (a >= 2.0) + (a >= 3.0) + (a >= 4.0) + (a >= 6.0)
    ).to(torch.uint8)
    lo = e2m1_decode(lo_code)
    step = torch.where(lo_code < 4, 0.5, torch.where(lo_code < 6, 1.0, 2.0))
    up = ((a - lo) > u * step) & (lo_code < 7)
    code = lo_code + up.to(torch.uint8)
    return code + 8 * ((y < 0) & (code > 0)).to(torch.uint8)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest e4m3 value (round to nearest even, saturating at ±448), as float8_e4m3fn."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., 2n] -> packed uint8 [..., n]: element 2i in the low nibble, 2i+1 in the high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [..., n] -> codes uint8 [..., 2n] (inverse of pack_e2m1)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------------------


class NVFP4Tensor(NamedTuple):
    """NVFP4 as NVIDIA lays it out; value = e2m1(code) * float(scale of its 16-block) * tensor_scale."""

    codes: torch.Tensor  # uint8 [..., K/2]: two e2m1 codes per byte along the last dim (even element low nibble)
    scales: torch.Tensor  # float8_e4m3fn [..., K/16]: one scale per 16 consecutive elements of the last dim
    tensor_scale: torch.Tensor  # float32 0-d: global amax / (6 * 448) at quantisation time

    @property
    def shape(self) -> torch.Size:
        """Logical shape [..., K] of the quantised tensor."""
        return torch.Size((*self.codes.shape[:-1], 2 * self.codes.shape[-1]))

    def numel(self) -> int:
        return self.codes.numel() * 2


def nvfp4_tensor_scale(w: torch.Tensor) -> torch.Tensor:
    """float32 0-d global scale amax / (6 * 448) (1.0 for an all-zero tensor): every block scale then fits e4m3."""
    amax = w.detach().float().abs().amax()
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


def _nvfp4_block_scales(blocks: torch.Tensor, tensor_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 blocks [B,16] -> (e4m3 block scales [B], requested float32 scales [B] before rounding/saturation)."""
    requested = blocks.abs().amax(dim=1) / (tensor_scale * E2M1_MAX)
    return round_e4m3(requested), requested


def _nvfp4_normalise(blocks: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """blocks [B,16] times 1 / (scale * tensor_scale) in float32 (one division per block, as the kernels do);
    blocks whose scale rounds to 0 normalise to 0."""
    denom = scales.float() * tensor_scale
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    inverse = torch.ones_like(safe) / safe
    return torch.where(denom[:, None] > 0, blocks * inverse[:, None], torch.zeros_like(blocks))


def _nvfp4_values(codes: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """codes [B,16] uint8, e4m3 scales [B] -> float32 [B,16] = (e2m1 * scale) * tensor_scale (one rounding)."""
    return (e2m1_decode(codes) * scales.float()[:, None]) * tensor_scale


def _check_nvfp4_shape(shape: torch.Size) -> None:
    if len(shape) == 0 or shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs a last dim that is a multiple of {NVFP4_BLOCK}; got shape {tuple(shape)}")


def quantize_nvfp4(w: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> NVFP4Tensor:
    """w[..., K] (K % 16 == 0, any float dtype) -> NVFP4Tensor, round to nearest even at both levels."""
    _check_nvfp4_shape(w.shape)
    x = w.detach().float()
    st = nvfp4_tensor_scale(x) if tensor_scale is None else tensor_scale.float().reshape(())
    blocks = x.reshape(-1, NVFP4_BLOCK)
    scales, _ = _nvfp4_block_scales(blocks, st)
    codes = e2m1_encode(_nvfp4_normalise(blocks, scales, st))
    lead = w.shape[:-1]
    return NVFP4Tensor(
        pack_e2m1(codes.reshape(*lead, w.shape[-1])), scales.reshape(*lead, w.shape[-1] // NVFP4_BLOCK), st.clone()
    )


def dequantize_nvfp4(q: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NVFP4Tensor -> [..., K] of dtype (float32 values rounded once to dtype)."""
    codes = unpack_e2m1(q.codes).reshape(-1, NVFP4_BLOCK)
    values = _nvfp4_values(codes, q.scales.reshape(-1), q.tensor_scale.float())
    return values.reshape(q.shape).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# FP8 (E4M3)
# ---------------------------------------------------------------------------------------------------------


def _div(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor correctly rounded on every device (CUDA torch turns division by a Python scalar into a
    multiplication by its rounded reciprocal, which is not the kernels' div_rn)."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 amax -> decode scale max(amax / 448, MIN_SCALE) (ZERO_SLICE_SCALE where amax == 0)."""
    return torch.where(amax > 0, _div(amax, E4M3_MAX).clamp(min=MIN_SCALE), torch.full_like(amax, ZERO_SLICE_SCALE))


def fp8_inverse(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales -> 1 / scale correctly rounded: every fp8 quantiser computes round_e4m3(x * fp8_inverse(scale)),
    one division per slice instead of one per element (the kernels too)."""
    return torch.ones_like(scale) / scale


def quantize_fp8_rowwise(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (float8_e4m3fn like x, float32 scales with `dim` removed); x ≈ q * scale, one scale per slice along dim."""
    xf = x.detach().float()
    scale = fp8_scale(xf.abs().amax(dim=dim, keepdim=True))
    return round_e4m3(xf * fp8_inverse(scale)), scale.squeeze(dim)


def _pad_to(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = x.shape[-2:]
    return F.pad(x, (0, -cols % block[1], 0, -rows % block[0]))


def _expand_blocks(scales: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Block scales [..., R/br, C/bc] -> per-element [..., R, C]."""
    full = scales.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return full[..., : shape[-2], : shape[-1]]


def quantize_fp8_blockwise(
    x: torch.Tensor, block: tuple[int, int] = (1, FP8_BLOCK)
) -> tuple[torch.Tensor, torch.Tensor]:
    """x[..., R, C] -> (float8_e4m3fn like x, float32 scales [..., ceil(R/br), ceil(C/bc)]), one scale per tile.

    (1, 128) tiles are DeepSeek-V3's activation recipe, (128, 128) its weight recipe; partial edge tiles are fine.
    """
    xf = x.detach().float()
    padded = _pad_to(xf, block)
    *lead, rows, cols = padded.shape
    tiles = padded.reshape(*lead, rows // block[0], block[0], cols // block[1], block[1])
    scales = fp8_scale(tiles.abs().amax(dim=(-3, -1)))
    return round_e4m3(xf * _expand_blocks(fp8_inverse(scales), block, x.shape)), scales


def group_chunks(offsets: torch.Tensor, chunk: int = FP8_BLOCK) -> list[tuple[int, int, int]]:
    """(chunk id, first row, end row) of every `chunk`-row piece of every group, numbered group after group.

    This is the tile order of the grouped GEMM kernels (empty groups have no chunk), so scale row `id` of a
    grouped-column quantisation belongs to rows [first, end). Host sync: reference only.
    """
    out, start, cid = [], 0, 0
    for size in group_sizes(offsets):
        for first in range(start, start + size, chunk):
            out.append((cid, first, min(first + chunk, start + size)))
            cid += 1
        start += size
    return out


def grouped_col_chunks(m: int, n_experts: int, chunk: int = FP8_BLOCK) -> int:
    """Upper bound on the number of chunks of group_chunks (rows of the grouped-column scale tensor)."""
    return -(-m // chunk) + n_experts


def quantize_fp8_grouped_cols(
    x: torch.Tensor, offsets: torch.Tensor, chunk: int = FP8_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """x[M,C] rows grouped by offsets -> (float8 [M,C], float32 scales [ceil(M/128)+E, C]) per 128-row chunk and column.

    The weight-gradient operands: a chunk never crosses a group boundary, so a group's dW = Σ over its chunks
    of scale_x ⊗ scale_dy ∘ (q_x^T q_dy). Rows past offsets[-1] quantise to 0; unused scale rows are 1.
    """
    checked_group_sizes(offsets, x.shape[0])
    xf = x.detach().float()
    scales = torch.ones(grouped_col_chunks(x.shape[0], offsets.shape[0], chunk), x.shape[1], device=x.device)
    q = torch.zeros(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    for cid, first, end in group_chunks(offsets, chunk):
        s = fp8_scale(xf[first:end].abs().amax(dim=0))
        scales[cid] = s
        q[first:end] = round_e4m3(xf[first:end] * fp8_inverse(s))
    return q, scales


def dequantize_fp8_grouped_cols(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype, chunk: int = FP8_BLOCK
) -> torch.Tensor:
    """Inverse of quantize_fp8_grouped_cols in dtype (rows past offsets[-1] are 0)."""
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    for cid, first, end in group_chunks(offsets, chunk):
        out[first:end] = q[first:end].to(dtype) * scales[cid].to(dtype)
    return out


def quantize_fp8_dw_cols(x: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[M,C] rows grouped by offsets -> (float8 [M,C], float32 scales [E,C]): one scale per column, shared by the
    experts (an empty group's row is ZERO_SLICE_SCALE).

    The rowwise recipe's weight-gradient operands: dW[e] sums over the rows of e, so these scales factor out of
    the sum (the GEMM accumulates codes only). Rows past offsets[-1] quantise to 0 and do not count.
    """
    sizes = checked_group_sizes(offsets, x.shape[0])
    routed = sum(sizes)
    xf = x.detach().float()
    shared = fp8_scale(xf[:routed].abs().amax(dim=0) if routed else xf.new_zeros(x.shape[1]))
    scales = shared.expand(len(sizes), -1).clone()
    scales[torch.tensor(sizes, device=x.device) == 0] = ZERO_SLICE_SCALE
    q = torch.zeros(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    q[:routed] = round_e4m3(xf[:routed] * fp8_inverse(shared))
    return q, scales


def dequantize_fp8_dw_cols(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of quantize_fp8_dw_cols in dtype (rows past offsets[-1] are 0)."""
    out = q.to(dtype) * scales.to(dtype)[_row_experts(offsets, q.shape[0])]
    out[int(offsets[-1]) if offsets.numel() else 0 :] = 0
    return out


def quantize_activation(x: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM left operand [M,K], scaled along K: rowwise -> scales [M]; blockwise 1x128 -> scales [M, ceil(K/128)]."""
    if scaling == "rowwise":
        return quantize_fp8_rowwise(x, dim=-1)
    return quantize_fp8_blockwise(x, (1, FP8_BLOCK))


def dequantize_activation(q: torch.Tensor, scales: torch.Tensor, scaling: str, dtype: torch.dtype) -> torch.Tensor:
    if scaling == "rowwise":
        return q.to(dtype) * scales.to(dtype)[:, None]
    return q.to(dtype) * _expand_blocks(scales.to(dtype), (1, FP8_BLOCK), q.shape)


def revive_dead_slices(scales: torch.Tensor) -> torch.Tensor:
    """Rowwise weight scales [E,S]: an all-zero slice's scale becomes the largest of its expert (1 when the whole
    matrix is zero). Its codes are 0 under any scale; folded into the other GEMM operand (`expert_gemm`), a typical
    scale keeps that operand's column inside e4m3's range, so the column still yields the dead slice's weight
    gradient (`rowwise_fp8_wgrads`: a zero-initialised projection must learn)."""
    dead = scales == ZERO_SLICE_SCALE
    top = scales.amax(dim=-1, keepdim=True)
    return torch.where(dead, torch.where(top == ZERO_SLICE_SCALE, 1.0, top), scales)


def quantize_weight(w: torch.Tensor, scaling: str, pass_: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w[E,K,N] for the forward (reduce over K) or dgrad (reduce over N) GEMM -> (float8 [E,K,N], float32 scales).

    rowwise: forward scales [E,N] (one per output column over K), dgrad scales [E,K] (one per row over N), dead
    slices revived (`revive_dead_slices`); blockwise: 128x128 tiles, scales [E, ceil(K/128), ceil(N/128)], the
    same for both passes.
    """
    if scaling == "blockwise":
        return quantize_fp8_blockwise(w, (FP8_BLOCK, FP8_BLOCK))
    q, scales = quantize_fp8_rowwise(w, dim=1 if pass_ == "fwd" else 2)
    return q, revive_dead_slices(scales)


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, scaling: str, pass_: str, dtype) -> torch.Tensor:
    if scaling == "blockwise":
        return q.to(dtype) * _expand_blocks(scales.to(dtype), (FP8_BLOCK, FP8_BLOCK), q.shape)
    return q.to(dtype) * (scales.to(dtype)[:, None, :] if pass_ == "fwd" else scales.to(dtype)[:, :, None])


# ---------------------------------------------------------------------------------------------------------
# FP8 grouped GEMM and expert MLP (the quantised math, in `compute` precision)
# ---------------------------------------------------------------------------------------------------------


def checked_group_sizes(offsets: torch.Tensor, m: int) -> list[int]:
    """Per-expert row counts; offsets must be non-decreasing and end at most at m."""
    sizes = group_sizes(offsets)
    if min(sizes, default=0) < 0 or sum(sizes) > m:
        raise ValueError(f"offsets must be non-decreasing and end at most at M={m}: {offsets.tolist()}")
    return sizes


def _grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x[M,K] @ w[e] per group in x's dtype; rows past offsets[-1] are 0."""
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for e, size in enumerate(checked_group_sizes(offsets, x.shape[0])):
        out[start : start + size] = x[start : start + size] @ w[e]
        start += size
    return out


def _grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a[M,K], b[M,N] -> [E,K,N] with out[e] = a[rows of e]^T @ b[rows of e]."""
    out = a.new_zeros(offsets.shape[0], a.shape[1], b.shape[1])
    start = 0
    for e, size in enumerate(checked_group_sizes(offsets, a.shape[0])):
        out[e] = a[start : start + size].T @ b[start : start + size]
        start += size
    return out


def fp8_wgrad(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, compute: torch.dtype, scaling: str
) -> torch.Tensor:
    """dW[e] = a^T b over the rows of e, both operands quantised per column: rowwise, one scale per column shared
    by the experts (`quantize_fp8_dw_cols`); blockwise, one per 128-row chunk (DeepSeek-V3's 128x1 wgrad tiles)."""
    if scaling == "rowwise":
        qa, sa = quantize_fp8_dw_cols(a, offsets)
        qb, sb = quantize_fp8_dw_cols(b, offsets)
        return _grouped_wgrad(
            dequantize_fp8_dw_cols(qa, sa, offsets, compute),
            dequantize_fp8_dw_cols(qb, sb, offsets, compute),
            offsets,
        )
    qa, sa = quantize_fp8_grouped_cols(a, offsets)
    qb, sb = quantize_fp8_grouped_cols(b, offsets)
    return _grouped_wgrad(
        dequantize_fp8_grouped_cols(qa, sa, offsets, compute),
        dequantize_fp8_grouped_cols(qb, sb, offsets, compute),
        offsets,
    )


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, scaling: str, compute: torch.dtype, pass_: str):
    """Grouped x[M,K] @ w[e] (pass_ 'fwd') or x[M,N] @ w[e]^T (pass_ 'dgrad') on fp8-quantised operands."""
    qx, sx = quantize_activation(x, scaling)
    qw, sw = quantize_weight(w, scaling, pass_)
    wd = dequantize_weight(qw, sw, scaling, pass_, compute)
    return _grouped(
        dequantize_activation(qx, sx, scaling, compute), wd if pass_ == "fwd" else wd.transpose(1, 2), offsets
    )


def _row_experts(offsets: torch.Tensor, m: int) -> torch.Tensor:
    """The expert of each of m grouped rows; the last expert for rows past offsets[-1] (as the kernels)."""
    rows = torch.arange(m, device=offsets.device)
    return torch.bucketize(rows, offsets.long(), right=True).clamp(max=offsets.shape[0] - 1)


def expert_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    scaling: str,
    compute: torch.dtype,
    pass_: str,
    fold_pass: str,
) -> torch.Tensor:
    """A GEMM of the fp8 expert MLP: blockwise, `fp8_gemm`; rowwise, w is quantised once for both passes, with the
    scales of the pass that is not fold_pass, and fold_pass (w_up's dgrad, w_down's forward) multiplies those
    scales into x's grouped rows before quantising x and reads the codes with unit scales."""
    if scaling == "blockwise":
        return fp8_gemm(x, w, offsets, scaling, compute, pass_)
    scale_pass = "fwd" if fold_pass == "dgrad" else "dgrad"
    qw, sw = quantize_weight(w, scaling, scale_pass)
    if pass_ == fold_pass:
        qx, sx = folded_rows(x, sw, offsets)
        wd = qw.to(compute)
    else:
        wd = dequantize_weight(qw, sw, scaling, scale_pass, compute)
        qx, sx = quantize_activation(x, scaling)
    return _grouped(
        dequantize_activation(qx, sx, scaling, compute), wd if pass_ == "fwd" else wd.transpose(1, 2), offsets
    )


def folded_rows(x: torch.Tensor, col_scales: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped rows x[M,C] times their expert's weight scales col_scales[E,C], quantised rowwise -> (codes, [M])."""
    return quantize_activation(x.detach().float() * col_scales[_row_experts(offsets, x.shape[0])], "rowwise")


def rowwise_fp8_wgrads(x_rows, act, dy_rows, d_pre, w_up, w_down, offsets, compute, weight=None):
    """(dw_up, dw_down) of the rowwise recipe on the codes its GEMMs already made: act's and d_pre's folded row
    codes (`expert_gemm`) are read as they are, and their row scales move into the other operand: x's and dy's
    row codes (dy times the routing weight when given), requantised per column (`quantize_fp8_dw_cols`; reading
    1-byte codes halves that pass's traffic). Each row's multipliers are multiplied first, as the kernels do. The
    folded weight scales come out as 1 / scale on their dW rows (w_down) or columns (w_up)."""
    experts = _row_experts(offsets, act.shape[0])
    _, s_up = quantize_weight(w_up, "rowwise", "fwd")  # [E, 2H], folded into d_pre
    _, s_down = quantize_weight(w_down, "rowwise", "dgrad")  # [E, H], folded into act
    q_act, s_act = folded_rows(act, s_down, offsets)
    q_dpre, s_dpre = folded_rows(d_pre, s_up, offsets)
    q, s = quantize_activation(dy_rows, "rowwise")
    factor = s * s_act if weight is None else s * s_act * weight.float()
    q_dy, s_dy = quantize_fp8_dw_cols(q.float() * factor[:, None], offsets)
    q, s = quantize_activation(x_rows, "rowwise")
    q_x, s_x = quantize_fp8_dw_cols(q.float() * (s * s_dpre)[:, None], offsets)
    dw_down = _grouped_wgrad(
        q_act.to(compute) / s_down.to(compute)[experts],
        dequantize_fp8_dw_cols(q_dy, s_dy, offsets, compute),
        offsets,
    )
    dw_up = _grouped_wgrad(
        dequantize_fp8_dw_cols(q_x, s_x, offsets, compute), q_dpre.to(compute) / s_up.to(compute)[experts], offsets
    )
    return dw_up, dw_down


def wgrad_of(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, compute: torch.dtype, fp8: bool, scaling: str = "blockwise"
) -> torch.Tensor:
    """dW[e] = a^T b over the rows of e: on fp8-quantised operands (fp8_wgrad), or on a and b as given."""
    if fp8:
        return fp8_wgrad(a, b, offsets, compute, scaling)
    return _grouped_wgrad(a.to(compute), b.to(compute), offsets)


class GroupedMMFP8(torch.autograd.Function):
    """Reference grouped_mm_fp8: forward, dgrad (and wgrad unless wgrad_fp8 is False) each on freshly quantised
    operands (straight-through)."""

    @staticmethod
    def forward(ctx, x, w, offsets, scaling, compute, wgrad_fp8):
        """x[M,K], w[E,K,N], offsets[E] int32 -> [M,N] in x.dtype (compute: the dtype the dequantised math runs in)."""
        ctx.save_for_backward(x, w, offsets)
        ctx.scaling, ctx.compute, ctx.wgrad_fp8 = scaling, compute, wgrad_fp8
        return fp8_gemm(x, w, offsets, scaling, compute, "fwd").to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dx = fp8_gemm(dy, w, offsets, ctx.scaling, ctx.compute, "dgrad").to(x.dtype)
        dw = wgrad_of(x, dy.to(x.dtype), offsets, ctx.compute, ctx.wgrad_fp8, ctx.scaling).to(w.dtype)
        return dx, dw, None, None, None, None


def grouped_mm_fp8(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    scaling: str = "rowwise",
    compute: torch.dtype | None = None,
    wgrad_fp8: bool = True,
) -> torch.Tensor:
    """Reference of nmoe.kernels.grouped_mm_fp8 (compute defaults to float32; the tests use float64)."""
    return GroupedMMFP8.apply(x, w, offsets, scaling, compute or torch.float32, wgrad_fp8)


def swiglu_f32(pre: torch.Tensor) -> torch.Tensor:
    """pre[M,2H] (gate | up) -> silu(gate) * up, computed in at least float32."""
    dtype = torch.promote_types(pre.dtype, torch.float32)
    gate, up = pre.to(dtype).chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(pre: torch.Tensor, d_act: torch.Tensor) -> torch.Tensor:
    """pre[M,2H], d_act[M,H] -> d_pre[M,2H] = [d_gate | d_up]."""
    gate, up = pre.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    return torch.cat([d_act * up * sig * (1 + gate * (1 - sig)), d_act * silu], dim=-1)


class ExpertMLPFP8(torch.autograd.Function):
    """Reference expert_mlp_fp8: rows -> fp8 up GEMM -> SwiGLU -> fp8 down GEMM, every GEMM fp8 in fwd and bwd."""

    @staticmethod
    def forward(ctx, rows, offsets, w_up, w_down, scaling, compute, wgrad_fp8):
        """rows[M,D] grouped by offsets[E], w_up[E,D,2H], w_down[E,H,D] -> [M,D] in rows.dtype."""
        pre = expert_gemm(rows, w_up, offsets, scaling, compute, "fwd", "dgrad").to(rows.dtype)
        act = swiglu_f32(pre).to(rows.dtype)  # as the bf16 path stores it
        out = expert_gemm(act, w_down, offsets, scaling, compute, "fwd", "fwd")
        ctx.save_for_backward(rows, offsets, w_up, w_down, pre)
        ctx.scaling, ctx.compute, ctx.wgrad_fp8 = scaling, compute, wgrad_fp8
        return out.to(rows.dtype)

    @staticmethod
    def backward(ctx, dy):
        rows, offsets, w_up, w_down, pre = ctx.saved_tensors
        scaling, compute, fp8 = ctx.scaling, ctx.compute, ctx.wgrad_fp8
        dy = dy.to(rows.dtype)
        d_act = _rounded_d_act(expert_gemm(dy, w_down, offsets, scaling, compute, "dgrad", "fwd"), scaling, rows.dtype)
        d_pre = swiglu_backward(pre.to(compute), d_act).to(rows.dtype)
        act = swiglu_f32(pre).to(rows.dtype)
        d_rows = expert_gemm(d_pre, w_up, offsets, scaling, compute, "dgrad", "dgrad").to(rows.dtype)
        if fp8 and scaling == "rowwise":
            dw_up, dw_down = rowwise_fp8_wgrads(rows, act, dy, d_pre, w_up, w_down, offsets, compute)
        else:
            dw_down = wgrad_of(act, dy, offsets, compute, fp8)
            dw_up = wgrad_of(rows, d_pre, offsets, compute, fp8)
        return d_rows, None, dw_up.to(w_up.dtype), dw_down.to(w_down.dtype), None, None, None


def expert_mlp_fp8(
    rows: torch.Tensor,
    offsets: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    scaling: str = "rowwise",
    compute: torch.dtype | None = None,
    wgrad_fp8: bool = True,
) -> torch.Tensor:
    """Reference of nmoe.kernels.expert_mlp_fp8 (compute defaults to float32; the tests use float64)."""
    return ExpertMLPFP8.apply(rows, offsets, w_up, w_down, scaling, compute or torch.float32, wgrad_fp8)


def _rounded_d_act(d_act: torch.Tensor, scaling: str, dtype: torch.dtype) -> torch.Tensor:
    """d_act as the kernels hand it to the SwiGLU backward: rowwise, the dgrad GEMM stores it in the activations'
    dtype; blockwise, the SwiGLU backward runs in that GEMM's epilogue on its float32 accumulators."""
    return d_act.to(dtype).to(d_act.dtype) if scaling == "rowwise" else d_act


def saved_act(scaling: str, wgrad_fp8: bool) -> str | None:
    """What the fp8 expert forward keeps of act[R,H] for the dW of the down projection: 'values' (rowwise, bf16 dW),
    'codes' (rowwise, fp8 dW: act's folded row codes and scales, `rowwise_fp8_wgrads`) or None (blockwise: act is
    quantised in the up GEMM's epilogue, and the backward recomputes it from gate|up)."""
    if scaling == "blockwise":
        return None
    return "codes" if wgrad_fp8 else "values"


def moe_experts_fp8_forward(x, topk_ids, topk_weights, w_up, w_down, scaling: str, compute: torch.dtype, wgrad_fp8):
    """The fp8 expert MLP on the gathered tokens, weighted combine -> (y[T,D] in x.dtype, offsets[E] int32,
    order[R] int64, token[R] int64, pre[R,2H]) with R = T*K grouped rows (dropped slots last)."""
    routing = sort_by_expert(topk_ids, w_up.shape[0])
    token = routing.order // topk_ids.shape[1]
    rows = x[token]
    pre = expert_gemm(rows, w_up, routing.offsets, scaling, compute, "fwd", "dgrad").to(x.dtype)
    act = swiglu_f32(pre).to(x.dtype)
    out = expert_gemm(act, w_down, routing.offsets, scaling, compute, "fwd", "fwd").to(x.dtype)
    weight = _routing_weights(topk_weights, routing.order, routing.offsets).to(compute)
    y = out.new_zeros(x.shape, dtype=compute).index_add(0, token, out.to(compute) * weight[:, None])
    return y.to(x.dtype), routing.offsets, routing.order, token, pre


def moe_experts_fp8_backward(
    dy, x, topk_weights, w_up, w_down, offsets, order, token, pre, scaling, compute, wgrad_fp8
):
    """dy[T,D] -> (dx[T,D], d_topk_weights[T,K], dw_up, dw_down) in the inputs' dtypes. As the kernels, dy is
    quantised in token order and the routing weight is applied after the down dgrad GEMM."""
    token = token.long()
    fp8 = wgrad_fp8
    dy_rows = dy.to(x.dtype)[token]
    weight = _routing_weights(topk_weights, order, offsets)
    d_weighted = expert_gemm(dy_rows, w_down, offsets, scaling, compute, "dgrad", "fwd")  # before the routing weight
    d_weighted = _rounded_d_act(d_weighted, scaling, x.dtype)
    act = swiglu_f32(pre).to(x.dtype)
    d_weights = torch.zeros(order.shape[0], dtype=compute, device=x.device)
    d_weights[order] = (d_weighted * act.to(compute)).sum(1)
    d_pre = swiglu_backward(pre.to(compute), d_weighted * weight.to(compute)[:, None]).to(x.dtype)
    d_rows = expert_gemm(d_pre, w_up, offsets, scaling, compute, "dgrad", "dgrad").to(compute)
    if fp8 and scaling == "rowwise":
        dw_up, dw_down = rowwise_fp8_wgrads(x[token], act, dy_rows, d_pre, w_up, w_down, offsets, compute, weight)
    else:
        weighted_dy = dy_rows.to(compute) * weight.to(compute)[:, None]
        dw_down = wgrad_of(act, weighted_dy.to(x.dtype) if fp8 else weighted_dy, offsets, compute, fp8)
        dw_up = wgrad_of(x[token], d_pre, offsets, compute, fp8)
    dx = torch.zeros(x.shape, dtype=compute, device=x.device).index_add(0, token, d_rows)
    d_weights = d_weights.view(topk_weights.shape).to(topk_weights.dtype)
    return dx.to(x.dtype), d_weights, dw_up.to(w_up.dtype), dw_down.to(w_down.dtype)


class MoEExpertsFP8(torch.autograd.Function):
    """Reference moe_experts_fp8 (autograd over `moe_experts_fp8_forward` / `_backward`)."""

    @staticmethod
    def forward(ctx, x, topk_ids, topk_weights, w_up, w_down, scaling, compute, wgrad_fp8):
        """x[T,D], topk_ids[T,K] (-1 dropped), topk_weights[T,K], w_up[E,D,2H], w_down[E,H,D] -> y[T,D] (x.dtype)."""
        y, offsets, order, token, pre = moe_experts_fp8_forward(
            x, topk_ids, topk_weights, w_up, w_down, scaling, compute, wgrad_fp8
        )
        ctx.save_for_backward(x, topk_weights, w_up, w_down, offsets, order, token, pre)
        ctx.scaling, ctx.compute, ctx.wgrad_fp8 = scaling, compute, wgrad_fp8
        return y

    @staticmethod
    def backward(ctx, dy):
        grads = moe_experts_fp8_backward(dy, *ctx.saved_tensors, ctx.scaling, ctx.compute, ctx.wgrad_fp8)
        dx, d_weights, dw_up, dw_down = grads
        return dx, None, d_weights, dw_up, dw_down, None, None, None


def _routing_weights(topk_weights: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The routing weight of each grouped row; 0 for dropped slots (rows past offsets[-1])."""
    weight = topk_weights.reshape(-1)[order].clone()
    weight[int(offsets[-1]) if offsets.numel() else 0 :] = 0
    return weight


def moe_experts_fp8(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    scaling: str = "rowwise",
    compute: torch.dtype | None = None,
    wgrad_fp8: bool = True,
) -> torch.Tensor:
    """Reference of nmoe.kernels.moe_experts_fp8 (compute defaults to float32; the tests use float64)."""
    return MoEExpertsFP8.apply(x, topk_ids, topk_weights, w_up, w_down, scaling, compute or torch.float32, wgrad_fp8)


# ---------------------------------------------------------------------------------------------------------
# Counter-based randomness: a pure function of (seed, step, element index)
# ---------------------------------------------------------------------------------------------------------


def hash32_int(x: int) -> int:
    """32-bit integer hash (lowbias32-style) on Python ints."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _HASH_MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _HASH_MUL2) & _MASK32
    return x ^ (x >> 15)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The same hash on an int64 tensor holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _HASH_MUL2) & _MASK32
    return x ^ (x >> 15)


def stream_key(seed: int, step: int) -> int:
    """uint32 key of the random stream of (seed, step); seeds and steps of any size fold in."""
    key = hash32_int(seed & _MASK32)
    key = hash32_int(key ^ ((seed >> 32) & _MASK32))
    return hash32_int(key ^ (step & _MASK32) ^ hash32_int((step >> 32) & _MASK32))


def element_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """int64 element indices -> int64 tensor of uint32 random bits, hash(lo ^ hash(hi ^ key)): one hash per
    element in the kernel, whose programs share hi."""
    return hash32((index & _MASK32) ^ hash32((index >> 32) ^ key))


# ---------------------------------------------------------------------------------------------------------
# NVFP4 AdamW
# ---------------------------------------------------------------------------------------------------------


class AdamWConstants(NamedTuple):
    """float32 scalars of one AdamW step, shared by the kernel (as arguments) and the reference.

    The bias corrections are folded into two scalars, as torch's fused AdamW does, so an element costs one
    square root and one division: update = m / (sqrt(v) * inv_sqrt_bc2 + eps) * step_size.
    """

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    step_size: float  # lr / (1 - beta1^step)
    inv_sqrt_bc2: float  # 1 / sqrt(1 - beta2^step)
    eps: float
    decay: float  # 1 - lr * weight_decay

    @classmethod
    def of(cls, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float):
        consts = (beta1, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1**step), (1 - beta2**step) ** -0.5, eps)
        return cls(*map(f32, (*consts, 1 - lr * weight_decay)))


def nvfp4_encode_scale(q: NVFP4Tensor) -> torch.Tensor:
    """float32 0-d tensor scale for re-quantising q's updated values: q.tensor_scale times 2^k (exact, no sync).

    k is the smallest k >= 0 that brings the largest block scale to <= 448 / 4, so a block can grow 4x in
    one step before its scale saturates. Powers of two keep requantisation lossless (scales and codes just
    shift exponent), so the tensor scale only ever grows, in whole binades, when the weights grow.
    """
    smax = q.scales.float().amax()
    mant, expo = torch.frexp(_div(smax, E4M3_MAX / NVFP4_SCALE_HEADROOM))
    k = torch.where(mant > 0.5, expo, expo - 1).clamp(min=0).to(torch.int32)
    return q.tensor_scale.float() * ((k + 127) << 23).view(torch.float32)


class NVFP4UpdateStats(NamedTuple):
    """Device statistics of one nvfp4_adamw_ call (nothing is synchronised until .metrics())."""

    flips: torch.Tensor  # int64 0-d: elements whose stored value changed
    sq_err: torch.Tensor  # float32 0-d: Σ (updated value - stored value)^2, the quantisation error of this step
    sq_norm: torch.Tensor  # float32 0-d: Σ updated value^2
    saturated: torch.Tensor  # int64 0-d: 16-blocks whose scale hit e4m3's 448 (values clipped)
    numel: int

    def metrics(self, prefix: str) -> dict[str, float]:
        """{prefix/flip_frac, prefix/quant_err (relative rms), prefix/saturated_blocks}; one host sync."""
        flips, sq_err, sq_norm, sat = torch.stack(
            [self.flips.double(), self.sq_err.double(), self.sq_norm.double(), self.saturated.double()]
        ).tolist()
        return {
            f"{prefix}/flip_frac": flips / max(self.numel, 1),
            f"{prefix}/quant_err": (sq_err / sq_norm) ** 0.5 if sq_norm > 0 else 0.0,
            f"{prefix}/saturated_blocks": sat,
        }


def adamw_moments(g, m, v, c: AdamWConstants) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 g, m, v -> (new m, new v, update m / (sqrt(v) / sqrt(bc2) + eps) * lr / bc1), one rounding per op."""
    # Python-float operands are float32-exact, so each op rounds once whatever precision torch computes it in.
    m = m * c.beta1 + g * c.one_minus_beta1
    v = v * c.beta2 + (g * g) * c.one_minus_beta2
    denom = v.double().sqrt().float() * c.inv_sqrt_bc2 + c.eps
    return m, v, (m / denom) * c.step_size


def nvfp4_adamw_(
    q: NVFP4Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    rule: str,
    seed: int,
    dither: float = 0.25,
    residual: torch.Tensor | None = None,
) -> NVFP4UpdateStats:
    """Reference of nmoe.kernels.nvfp4_adamw_ (in place on q.codes, q.scales, q.tensor_scale, moments, residual)."""
    c = AdamWConstants.of(step, lr, beta1, beta2, eps, weight_decay)
    dev = grad.device
    st_dec = q.tensor_scale.float()
    st_enc = nvfp4_encode_scale(q)
    codes_old = unpack_e2m1(q.codes).reshape(-1, NVFP4_BLOCK)
    scales_old = q.scales.reshape(-1)
    old = _nvfp4_values(codes_old, scales_old, st_dec)
    w = old if residual is None else old + residual.reshape(-1, NVFP4_BLOCK).float()
    g = grad.reshape(-1, NVFP4_BLOCK).float()
    m, v, update = adamw_moments(g, exp_avg.reshape(-1, NVFP4_BLOCK), exp_avg_sq.reshape(-1, NVFP4_BLOCK), c)
    target = w * c.decay - update

    scales, requested = _nvfp4_block_scales(target, st_enc)
    y = _nvfp4_normalise(target, scales, st_enc)
    codes = e2m1_encode(y)
    index = torch.arange(target.numel(), device=dev, dtype=torch.int64).reshape(target.shape)
    if rule in ("seed", "stochastic"):
        bits = element_bits(stream_key(seed, step), index)
        if rule == "stochastic":
            codes = e2m1_stochastic(y, (bits & 0xFFFFFF).float() * f32(2.0**-24))
        else:
            stuck = _nvfp4_values(codes, scales, st_enc) == old
            chosen = stuck & ((bits >> 31) == 1)
            shift = torch.where(((bits >> 30) & 1) == 1, f32(dither), -f32(dither))
            codes = torch.where(chosen, e2m1_encode(y + shift), codes)
    new = _nvfp4_values(codes, scales, st_enc)

    q.codes.copy_(pack_e2m1(codes).reshape(q.codes.shape))
    q.scales.copy_(scales.reshape(q.scales.shape))
    q.tensor_scale.copy_(st_enc)
    exp_avg.copy_(m.reshape(exp_avg.shape))
    exp_avg_sq.copy_(v.reshape(exp_avg_sq.shape))
    if residual is not None:
        residual.copy_((target - new).to(residual.dtype).reshape(residual.shape))
    return NVFP4UpdateStats(
        flips=(new != old).sum(),
        sq_err=((target - new) ** 2).sum(),
        sq_norm=(target**2).sum(),
        saturated=(requested > E4M3_MAX).sum(),
        numel=target.numel(),
    )
