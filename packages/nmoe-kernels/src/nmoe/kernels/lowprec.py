"""Low-precision expert path: FP8 (E4M3) grouped GEMMs, NVFP4 weight storage with a fused AdamW, quantisers.

Like the bf16 ops: CUDA tensors (sm_90 / sm_100) run Triton kernels, CPU tensors run the plain-PyTorch
reference `nmoe.kernels.reference_lowprec` (also the tests' oracle), and refused input raises UnsupportedInput.
"""

from __future__ import annotations

import torch

from nmoe.kernels import reference_lowprec as R
from nmoe.kernels._dispatch import check_aligned, use_triton
from nmoe.kernels.api import _check_grouped_mm, _check_moe, _check_ndim
from nmoe.kernels.errors import UnsupportedInput
from nmoe.kernels.reference_lowprec import RULES, SCALINGS, NVFP4Tensor, NVFP4UpdateStats

PRECISION_MODES = ("bf16", "fp8", "nvfp4", "nvfp4_gemm", "mxfp8")
FLOAT_DTYPES = (torch.bfloat16, torch.float32)

__all__ = [
    "NVFP4Tensor",
    "NVFP4UpdateStats",
    "PRECISION_MODES",
    "RULES",
    "SCALINGS",
    "check_precision_supported",
    "dequantize_nvfp4",
    "expert_mlp_fp8",
    "expert_param_bytes",
    "grouped_mm_fp8",
    "moe_experts_fp8",
    "nvfp4_adamw_",
    "quantize_fp8_blockwise",
    "quantize_fp8_rowwise",
    "quantize_nvfp4",
]


# ---------------------------------------------------------------------------------------------------------
# What runs where
# ---------------------------------------------------------------------------------------------------------

_BLACKWELL_ONLY = (
    "{mode} tensor-core GEMMs need Blackwell (sm_100a block-scaled MMA); {where}. On Hopper use precision "
    "'nvfp4' (NVFP4 storage of the expert weights, dequantised to bf16 for the GEMM) or 'fp8' (E4M3 GEMMs)."
)


def precision_verdict(mode: str, capability: tuple[int, int] | None, name: str = "CPU") -> str:
    """What `mode` means on a device of this compute capability (None: CPU); raises UnsupportedInput if it cannot run."""
    if mode not in PRECISION_MODES:
        raise UnsupportedInput(f"unknown precision {mode!r}; choose one of {', '.join(PRECISION_MODES)}")
    where = "the CPU" if capability is None else f"{name} is sm_{capability[0]}{capability[1]}"
    if mode in ("nvfp4_gemm", "mxfp8"):
        label = "NVFP4" if mode == "nvfp4_gemm" else "MXFP8"
        if capability is not None and capability[0] == 10:
            raise UnsupportedInput(
                f"{label} tensor-core GEMMs run on {name} (sm_100) but nmoe.kernels has no such kernel yet; use "
                "precision 'nvfp4' (NVFP4 storage, bf16 GEMM) or 'fp8'."
            )
        raise UnsupportedInput(_BLACKWELL_ONLY.format(mode=label, where=where))
    if capability is None:
        return {
            "bf16": "bf16/fp32 expert GEMMs (plain-PyTorch reference on CPU)",
            "fp8": "E4M3 GEMMs emulated by the plain-PyTorch reference on CPU (quantised math, float32 compute)",
            "nvfp4": "NVFP4 storage of expert weights, dequantised for the GEMM (plain-PyTorch reference on CPU)",
        }[mode]
    if capability[0] not in (9, 10):
        fp8_note = " fp8 GEMMs need FP8 tensor cores (sm_89+)." if mode == "fp8" and capability < (8, 9) else ""
        raise UnsupportedInput(
            f"precision {mode!r}: {where}; nmoe.kernels runs on sm_90 (Hopper) and sm_100 (Blackwell) only."
            f"{fp8_note} Move the model to the CPU for the reference implementation."
        )
    if mode == "fp8":
        return f"E4M3 tensor-core GEMMs (wgmma on sm_90) with fp32 accumulation on {name}"
    if mode == "nvfp4":
        why = "Hopper has no FP4 tensor cores" if capability[0] == 9 else "no FP4 GEMM kernel in nmoe.kernels yet"
        return f"NVFP4 storage of expert weights, dequantised to bf16 for the bf16 GEMM ({why})"
    return f"bf16 tensor-core GEMMs on {name}"


def check_precision_supported(mode: str, device: torch.device | str) -> str:
    """Raise UnsupportedInput unless precision `mode` can run on `device`; return one line saying what it means there."""
    device = torch.device(device)
    if device.type == "cpu":
        return precision_verdict(mode, None)
    if device.type != "cuda":
        raise UnsupportedInput(f"device type {device.type!r} is not supported: use CUDA (sm_90/sm_100) or CPU")
    capability = tuple(torch.cuda.get_device_capability(device))
    return precision_verdict(mode, capability, torch.cuda.get_device_name(device))


def expert_param_bytes(mode: str, rule: str = "nearest") -> dict[str, float]:
    """Persistent bytes per routed-expert parameter: weights + AdamW state (+ residual), and the per-step transient.

    bf16: fp32 master + fp32 m, v (GEMMs read a transient bf16 cast); fp8: the same state, the GEMMs quantise
    transient e4m3 copies (forward and dgrad layouts); nvfp4: 4-bit codes + one e4m3 scale per 16 (0.5625 B),
    fp32 m, v, plus a bf16 residual for rule 'residual'; the GEMM reads a transient bf16 dequantised copy.
    """
    if mode not in ("bf16", "fp8", "nvfp4"):
        raise UnsupportedInput(f"expert_param_bytes: mode must be bf16, fp8 or nvfp4; got {mode!r}")
    if mode == "nvfp4" and rule not in RULES:
        raise UnsupportedInput(f"unknown NVFP4 rounding rule {rule!r}; choose one of {', '.join(RULES)}")
    weights = {"bf16": 4.0, "fp8": 4.0, "nvfp4": 0.5 + 1 / R.NVFP4_BLOCK}[mode]
    residual = 2.0 if mode == "nvfp4" and rule == "residual" else 0.0
    out = dict(weights=weights, exp_avg=4.0, exp_avg_sq=4.0, residual=residual)
    out["total"] = sum(out.values())
    out["transient"] = 2.0  # bf16 cast / two e4m3 layouts / bf16 dequantised copy, alive during fwd+bwd
    return out


# ---------------------------------------------------------------------------------------------------------
# Quantisers
# ---------------------------------------------------------------------------------------------------------


def _check_float_input(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise UnsupportedInput(
            f"{name} has dtype {t.dtype}; the low-precision ops take torch.bfloat16 or torch.float32"
        )


def quantize_nvfp4(w: torch.Tensor) -> NVFP4Tensor:
    """w[..., K] bf16/fp32, K % 16 == 0 -> NVFP4Tensor(codes uint8 [..., K/2], scales e4m3 [..., K/16], fp32 0-d)."""
    _check_float_input("w", w)
    if w.dim() == 0 or w.shape[-1] % R.NVFP4_BLOCK:
        raise UnsupportedInput(f"NVFP4 needs a last dim that is a multiple of 16; got shape {tuple(w.shape)}")
    if not use_triton(w):
        return R.quantize_nvfp4(w)
    from nmoe.kernels import _lowprec_ops

    return _lowprec_ops.nvfp4_quantize(w.detach().contiguous(), R.nvfp4_tensor_scale(w))


def _check_nvfp4(q: NVFP4Tensor) -> None:
    if not isinstance(q, NVFP4Tensor):
        raise UnsupportedInput(f"expected an NVFP4Tensor (from quantize_nvfp4); got {type(q).__name__}")
    codes, scales, st = q
    if (
        codes.dtype != torch.uint8
        or scales.dtype != torch.float8_e4m3fn
        or st.dtype != torch.float32
        or st.numel() != 1
    ):
        raise UnsupportedInput(
            f"NVFP4Tensor must hold uint8 codes, float8_e4m3fn scales and a float32 tensor scale; got "
            f"{codes.dtype}, {scales.dtype}, {st.dtype}[{st.numel()}]"
        )
    if scales.shape != (*codes.shape[:-1], codes.shape[-1] * 2 // R.NVFP4_BLOCK) or codes.shape[-1] % 8:
        raise UnsupportedInput(f"NVFP4Tensor codes {tuple(codes.shape)} and scales {tuple(scales.shape)} disagree")
    if not (codes.is_contiguous() and scales.is_contiguous()):
        raise UnsupportedInput("NVFP4Tensor codes and scales must be contiguous")


def dequantize_nvfp4(q: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """NVFP4Tensor -> [..., K] in dtype (bf16 or fp32): value = e2m1 * block scale * tensor scale, rounded once."""
    _check_nvfp4(q)
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedInput(f"dequantize_nvfp4 writes torch.bfloat16 or torch.float32; got {dtype}")
    if not use_triton(*q):
        return R.dequantize_nvfp4(q, dtype)
    from nmoe.kernels import _lowprec_ops

    return _lowprec_ops.nvfp4_dequantize(q, dtype)


def quantize_fp8_rowwise(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x[M,C] (dim -1) or w[E,K,N] (dim 1 or 2) -> (float8_e4m3fn like x, float32 scales, dim removed); x ≈ q*s."""
    _check_float_input("x", x)
    dim = dim % max(x.dim(), 1)
    if not ((x.dim() == 2 and dim == 1) or (x.dim() == 3 and dim in (1, 2))):
        raise UnsupportedInput(
            f"quantize_fp8_rowwise takes [M,C] along dim -1 or [E,K,N] along dim 1 or 2; got {tuple(x.shape)}, dim={dim}"
        )
    if not use_triton(x):
        return R.quantize_fp8_rowwise(x, dim)
    from nmoe.kernels import _lowprec_ops

    if x.dim() == 2:
        return _lowprec_ops.quantize_rows(x.contiguous(), blockwise=False)
    return _lowprec_ops._weight_rowwise(x, reduce_dim=dim, transpose=False)[:2]


def quantize_fp8_blockwise(x: torch.Tensor, block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x[M,C] in 1x128 tiles or w[E,K,N] in 128x128 tiles -> (float8_e4m3fn like x, float32 scales per tile)."""
    _check_float_input("x", x)
    expected = (1, R.FP8_BLOCK) if x.dim() == 2 else (R.FP8_BLOCK, R.FP8_BLOCK)
    block = expected if block is None else tuple(block)
    if x.dim() not in (2, 3) or block != expected:
        raise UnsupportedInput(
            f"quantize_fp8_blockwise takes activations [M,C] with (1,128) tiles or weights [E,K,N] with (128,128) "
            f"tiles (DeepSeek-V3's recipe); got {tuple(x.shape)} with {block}"
        )
    if not use_triton(x):
        return R.quantize_fp8_blockwise(x, block)
    from nmoe.kernels import _lowprec_ops

    if x.dim() == 2:
        return _lowprec_ops.quantize_rows(x.contiguous(), blockwise=True)
    q, _, s = _lowprec_ops._weight_blockwise(x, True, False)
    return q, s


# ---------------------------------------------------------------------------------------------------------
# FP8 GEMMs
# ---------------------------------------------------------------------------------------------------------


def _check_recipe(scaling: str, wgrad_fp8: bool, fast_accum: bool) -> None:
    if scaling not in SCALINGS:
        raise UnsupportedInput(f"scaling must be one of {', '.join(SCALINGS)}; got {scaling!r}")
    if not isinstance(wgrad_fp8, bool) or not isinstance(fast_accum, bool):
        raise UnsupportedInput(f"wgrad_fp8 and fast_accum are bools; got {wgrad_fp8!r} and {fast_accum!r}")
    if fast_accum and scaling == "blockwise":
        raise UnsupportedInput(
            "fast_accum applies to scaling='rowwise' only: blockwise scales change every 128 elements of K, so "
            "each 128-block's product is promoted to float32 by construction; use rowwise or fast_accum=False"
        )


def grouped_mm_fp8(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    scaling: str = "rowwise",
    *,
    wgrad_fp8: bool = True,
    fast_accum: bool = False,
) -> torch.Tensor:
    """x[M,K] @ w[e][K,N] per group with E4M3 operands quantised inside -> [M,N] in x.dtype; autograd (fp8 dX, dW).

    scaling 'rowwise': per-row x / per-column w scales; 'blockwise': 1x128 x and 128x128 w tiles. dW quantises
    its operands per column, one scale shared by the groups (rowwise), or per column and 128-row chunk of a group
    (blockwise), or with wgrad_fp8=False runs the bf16/fp32 grouped GEMM on x and dy as they are. fast_accum
    (rowwise, GPU): keep Hopper's reduced-precision fp8 accumulator over the whole K instead of promoting each
    128-block to float32. x, w: bf16 or fp32 (each).
    """
    _check_recipe(scaling, wgrad_fp8, fast_accum)
    _check_grouped_mm(x, w, offsets)
    _check_float_input("x", x)
    _check_float_input("w", w)
    if not use_triton(x, w, offsets):
        return R.grouped_mm_fp8(x, w, offsets, scaling, wgrad_fp8=wgrad_fp8)
    check_aligned(K=x.shape[1], N=w.shape[2])
    from nmoe.kernels._lowprec_ops import GroupedMMFP8

    return GroupedMMFP8.apply(x.contiguous(), w, offsets.contiguous(), scaling, wgrad_fp8, fast_accum)


def _check_expert_mlp(rows, offsets, w_up, w_down) -> None:
    _check_ndim("rows", rows, 2, "[M,D]")
    _check_ndim("offsets", offsets, 1, "[E]")
    _check_ndim("w_up", w_up, 3, "[E,D,2H]")
    _check_ndim("w_down", w_down, 3, "[E,H,D]")
    n_experts, d, h2 = w_up.shape
    if rows.shape[1] != d or h2 % 2 or tuple(w_down.shape) != (n_experts, h2 // 2, d):
        raise UnsupportedInput(
            f"rows {tuple(rows.shape)}, w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)} must be "
            "[M,D], [E,D,2H], [E,H,D]"
        )
    if offsets.shape[0] != n_experts or offsets.dtype != torch.int32:
        raise UnsupportedInput(f"offsets must be int32 [E={n_experts}]; got {offsets.dtype} {tuple(offsets.shape)}")
    for name, t in (("rows", rows), ("w_up", w_up), ("w_down", w_down)):
        _check_float_input(name, t)


def expert_mlp_fp8(
    rows: torch.Tensor,
    offsets: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    scaling: str = "rowwise",
    *,
    wgrad_fp8: bool = True,
    fast_accum: bool = False,
) -> torch.Tensor:
    """rows[M,D] grouped by expert (offsets[E] int32), w_up[E,D,2H] (gate|up), w_down[E,H,D] -> [M,D] in rows.dtype.

    down(silu(gate) * up) per expert with E4M3 GEMMs forward and dgrad, and wgrad unless wgrad_fp8=False (then
    the bf16/fp32 grouped GEMM on the unquantised rows, act, dy and d_pre); fast_accum as in grouped_mm_fp8.
    Autograd through rows and both weights; rows past offsets[-1] give 0.
    """
    _check_recipe(scaling, wgrad_fp8, fast_accum)
    _check_expert_mlp(rows, offsets, w_up, w_down)
    if not use_triton(rows, offsets, w_up, w_down):
        return R.expert_mlp_fp8(rows, offsets, w_up, w_down, scaling, wgrad_fp8=wgrad_fp8)
    check_aligned(D=rows.shape[1], H=w_down.shape[1])
    from nmoe.kernels._lowprec_ops import ExpertMLPFP8

    return ExpertMLPFP8.apply(rows.contiguous(), offsets.contiguous(), w_up, w_down, scaling, wgrad_fp8, fast_accum)


def moe_experts_fp8(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    scaling: str = "rowwise",
    *,
    wgrad_fp8: bool = True,
    fast_accum: bool = False,
) -> torch.Tensor:
    """x[T,D], topk ids/weights[T,K], w_up[E,D,2H] (gate|up), w_down[E,H,D] -> y[T,D] = sum_k w_tk expert(x_t).

    moe_experts with expert_mlp_fp8's GEMMs (same recipe options), fused the same way: each token is quantised once
    in token order and gathered by the up GEMM (dy likewise by the down dgrad GEMM), the routing weights are applied
    in the combine and, with their gradient, in the SwiGLU-backward epilogue. topk_ids == -1 drops a slot.
    """
    _check_recipe(scaling, wgrad_fp8, fast_accum)
    _check_moe(x, topk_ids, topk_weights, w_up, w_down)
    for name, t in (("x", x), ("w_up", w_up), ("w_down", w_down)):
        _check_float_input(name, t)
    from nmoe.kernels import _ops  # the op and its fake check the device and alignment (at trace time too)

    y, *_ = _ops.moe_experts_fp8(
        x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous(), w_up, w_down, scaling, wgrad_fp8, fast_accum
    )
    return y


# ---------------------------------------------------------------------------------------------------------
# NVFP4 AdamW
# ---------------------------------------------------------------------------------------------------------


def _check_adamw(q, grad, exp_avg, exp_avg_sq, residual, rule, step) -> None:
    _check_nvfp4(q)
    if rule not in RULES:
        raise UnsupportedInput(f"unknown NVFP4 rounding rule {rule!r}; choose one of {', '.join(RULES)}")
    if not isinstance(step, int) or step < 1:
        raise UnsupportedInput(f"step must be a Python int >= 1 (the AdamW step count); got {step!r}")
    for name, t, dtypes in (
        ("grad", grad, FLOAT_DTYPES),
        ("exp_avg", exp_avg, (torch.float32,)),
        ("exp_avg_sq", exp_avg_sq, (torch.float32,)),
    ):
        if t.shape != q.shape or t.dtype not in dtypes or not t.is_contiguous():
            raise UnsupportedInput(
                f"{name} must be a contiguous {' or '.join(map(str, dtypes))} tensor of shape {tuple(q.shape)}; "
                f"got {t.dtype} {tuple(t.shape)}"
            )
    if (rule == "residual") != (residual is not None):
        raise UnsupportedInput(
            "pass residual (a bf16 tensor like the weights, zeros at first) exactly with rule='residual'"
        )
    if residual is not None and (
        residual.shape != q.shape or residual.dtype != torch.bfloat16 or not residual.is_contiguous()
    ):
        raise UnsupportedInput(
            f"residual must be a contiguous torch.bfloat16 tensor of shape {tuple(q.shape)}; got "
            f"{residual.dtype} {tuple(residual.shape)}"
        )


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
    """One AdamW step on NVFP4-stored weights, in place (codes, scales, tensor scale, fp32 moments, residual).

    The value dequant(q) (+ residual) gets the decoupled-weight-decay AdamW update in float32; each 16-block's
    scale is recomputed from the updated block (the tensor scale only grows, by exact powers of two, see
    reference_lowprec.nvfp4_encode_scale); the block is re-quantised by `rule`: 'nearest' (to nearest even),
    'seed' (the seed project's dither: half the codes that would not move get ±dither in the normalised FP4
    domain), 'stochastic' (unbiased stochastic rounding of every element) or 'residual' (error feedback
    through the bf16 `residual`). Random draws are a pure function of (seed, step, element index): give each
    tensor its own seed. Returns device statistics (flip count, squared quantisation error), no host sync.
    """
    _check_adamw(q, grad, exp_avg, exp_avg_sq, residual, rule, step)
    tensors = [*q, grad, exp_avg, exp_avg_sq] + ([] if residual is None else [residual])
    hyper = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if not use_triton(*tensors):
        return R.nvfp4_adamw_(
            q, grad, exp_avg, exp_avg_sq, **hyper, rule=rule, seed=seed, dither=dither, residual=residual
        )
    from nmoe.kernels import _lowprec_ops

    constants = R.AdamWConstants.of(step, lr, beta1, beta2, eps, weight_decay)
    return _lowprec_ops.nvfp4_adamw(
        q, grad, exp_avg, exp_avg_sq, residual, constants, rule, R.stream_key(seed, step), dither
    )
