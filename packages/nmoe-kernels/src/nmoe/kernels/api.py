"""Public ops: validate input, then dispatch to Triton (CUDA) or the reference (CPU)."""

from __future__ import annotations

import os

import torch

from nmoe.kernels import reference
from nmoe.kernels.errors import UnsupportedInput
from nmoe.kernels.reference import ExpertSort

GPU_DTYPES = (torch.bfloat16, torch.float32)
ALIGN = 16  # feature dims (D, H, grouped_mm K and N) must be multiples of this on the GPU path
SUPPORTED_CAPABILITIES = (9, 10)  # Hopper (sm_90) and Blackwell (sm_100)


def _force_triton() -> bool:
    """Tests run the Triton kernels on CPU tensors under TRITON_INTERPRET=1 with NMOE_KERNELS_FORCE_TRITON=1."""
    if os.environ.get("NMOE_KERNELS_FORCE_TRITON") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise UnsupportedInput(
            "NMOE_KERNELS_FORCE_TRITON=1 on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


def _check_gpu(device: torch.device) -> None:
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_CAPABILITIES:
        name = torch.cuda.get_device_name(device)
        raise UnsupportedInput(
            f"{name} has compute capability {major}.{minor}; nmoe.kernels supports sm_90 (Hopper) and sm_100 "
            "(Blackwell) only. Move the tensors to the CPU to use the reference implementation."
        )


def _use_triton(*tensors: torch.Tensor) -> bool:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise UnsupportedInput(f"all tensors must be on one device; got {device} and {t.device}")
    if device.type == "cpu":
        return _force_triton()
    if device.type != "cuda":
        raise UnsupportedInput(f"device type {device.type!r} is not supported: use CUDA (sm_90/sm_100) or CPU tensors")
    _check_gpu(device)
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise UnsupportedInput(
            "the CUDA path needs triton; install it (pip install triton) or use CPU tensors"
        ) from err
    return True


def _check_float(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise UnsupportedInput(f"{name} has dtype {t.dtype}; expected {dtype} like the other operands")
    if dtype not in GPU_DTYPES:
        raise UnsupportedInput(f"dtype {dtype} is not supported on the GPU path; use torch.bfloat16 or torch.float32")


def _check_aligned(**dims: int) -> None:
    for name, value in dims.items():
        if value % ALIGN:
            raise UnsupportedInput(f"{name}={value} must be a multiple of {ALIGN} on the GPU path (pad the weights)")


def _check_ndim(name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if t.dim() != ndim:
        raise UnsupportedInput(f"{name} must be {shape_doc}; got shape {tuple(t.shape)}")


def _check_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    _check_ndim("x", x, 2, "[M,K]")
    _check_ndim("w", w, 3, "[E,K,N]")
    _check_ndim("offsets", offsets, 1, "[E]")
    if x.shape[1] != w.shape[1]:
        raise UnsupportedInput(f"x[M,K] and w[E,K,N] disagree on K: {x.shape[1]} vs {w.shape[1]}")
    if offsets.shape[0] != w.shape[0] or offsets.dtype != torch.int32:
        raise UnsupportedInput(f"offsets must be int32 [E={w.shape[0]}]; got {offsets.dtype} {tuple(offsets.shape)}")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x[M,K] @ w[e][K,N] per expert group (offsets[E] int32 cumulative end rows) -> [M,N]; rows >= offsets[-1] are 0."""
    _check_grouped_mm(x, w, offsets)
    if not _use_triton(x, w, offsets):
        return reference.grouped_mm(x, w, offsets)
    _check_float("w", w, x.dtype)
    _check_float("x", x, x.dtype)
    _check_aligned(K=x.shape[1], N=w.shape[2])
    from nmoe.kernels._triton_ops import GroupedMM

    return GroupedMM.apply(x.contiguous(), w, offsets.contiguous())


def _check_topk(topk_ids: torch.Tensor) -> None:
    _check_ndim("topk_ids", topk_ids, 2, "[T,K]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise UnsupportedInput(f"topk_ids must be int32 or int64; got {topk_ids.dtype}")


def sort_by_expert(topk_ids: torch.Tensor, n_experts: int) -> ExpertSort:
    """topk_ids[T,K] in [0,E) -> ExpertSort(counts[E] int32, offsets[E] int32, order[T*K] int64), stable, no host sync."""
    _check_topk(topk_ids)
    if n_experts < 1:
        raise UnsupportedInput(f"n_experts must be positive; got {n_experts}")
    if not _use_triton(topk_ids):
        return reference.sort_by_expert(topk_ids, n_experts)
    from nmoe.kernels._triton_ops import route

    return route(topk_ids.contiguous(), n_experts)[0]


def _check_moe(x, topk_ids, topk_weights, w_up, w_down) -> None:
    _check_ndim("x", x, 2, "[T,D]")
    _check_topk(topk_ids)
    _check_ndim("w_up", w_up, 3, "[E,D,2H]")
    _check_ndim("w_down", w_down, 3, "[E,H,D]")
    n_experts, d, h2 = w_up.shape
    if topk_weights.shape != topk_ids.shape or not topk_weights.dtype.is_floating_point:
        raise UnsupportedInput(
            f"topk_weights must be float {tuple(topk_ids.shape)}; got {topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    if x.shape[0] != topk_ids.shape[0] or x.shape[1] != d or h2 % 2:
        raise UnsupportedInput(
            f"x {tuple(x.shape)}, topk_ids {tuple(topk_ids.shape)} and w_up {tuple(w_up.shape)} "
            "must be [T,D], [T,K] and [E,D,2H]"
        )
    if tuple(w_down.shape) != (n_experts, h2 // 2, d):
        raise UnsupportedInput(f"w_down must be [E,H,D]={(n_experts, h2 // 2, d)}; got {tuple(w_down.shape)}")


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x[T,D], topk ids/weights[T,K], w_up[E,D,2H] (gate|up), w_down[E,H,D] -> y[T,D] = sum_k w_tk expert(x_t)."""
    _check_moe(x, topk_ids, topk_weights, w_up, w_down)
    if not _use_triton(x, topk_ids, topk_weights, w_up, w_down):
        return reference.moe_experts(x, topk_ids, topk_weights, w_up, w_down)
    _check_float("w_up", w_up, x.dtype)
    _check_float("w_down", w_down, x.dtype)
    _check_float("x", x, x.dtype)
    _check_aligned(D=x.shape[1], H=w_down.shape[1])
    from nmoe.kernels._triton_ops import MoEExperts

    return MoEExperts.apply(x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous(), w_up, w_down)
