"""Which implementation runs (Triton on CUDA, the reference on CPU) and the GPU path's input rules.

Called inside the custom ops and their fake (meta) implementations, so a compiled graph refuses bad input
at trace time with the same errors as eager.
"""

from __future__ import annotations

import os

import torch

from nmoe.kernels.errors import UnsupportedInput

GPU_DTYPES = (torch.bfloat16, torch.float32)
ALIGN = 16  # feature dims (D, H, grouped_mm K and N) must be multiples of this on the GPU path
SUPPORTED_CAPABILITIES = (9, 10)  # Hopper (sm_90) and Blackwell (sm_100)


def force_triton() -> bool:
    """Tests run the Triton kernels on CPU tensors under TRITON_INTERPRET=1 with NMOE_KERNELS_FORCE_TRITON=1."""
    if os.environ.get("NMOE_KERNELS_FORCE_TRITON") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise UnsupportedInput(
            "NMOE_KERNELS_FORCE_TRITON=1 on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


def check_gpu(device: torch.device) -> None:
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_CAPABILITIES:
        name = torch.cuda.get_device_name(device)
        raise UnsupportedInput(
            f"{name} has compute capability {major}.{minor}; nmoe.kernels supports sm_90 (Hopper) and sm_100 "
            "(Blackwell) only. Move the tensors to the CPU to use the reference implementation."
        )


def check_same_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise UnsupportedInput(f"all tensors must be on one device; got {device} and {t.device}")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True for CUDA tensors (checked: architecture, triton installed), False for CPU (the reference)."""
    check_same_device(*tensors)
    device = tensors[0].device
    if device.type == "cpu":
        return force_triton()
    if device.type != "cuda":
        raise UnsupportedInput(f"device type {device.type!r} is not supported: use CUDA (sm_90/sm_100) or CPU tensors")
    check_gpu(device)
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise UnsupportedInput(
            "the CUDA path needs triton; install it (pip install triton) or use CPU tensors"
        ) from err
    return True


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise UnsupportedInput(f"{name} has dtype {t.dtype}; expected {dtype} like the other operands")
    if dtype not in GPU_DTYPES:
        raise UnsupportedInput(f"dtype {dtype} is not supported on the GPU path; use torch.bfloat16 or torch.float32")


def check_aligned(**dims: int) -> None:
    for name, value in dims.items():
        if value % ALIGN:
            raise UnsupportedInput(f"{name}={value} must be a multiple of {ALIGN} on the GPU path (pad the weights)")


def grouped_mm_on_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> bool:
    if not use_triton(x, w, offsets):
        return False
    check_float("w", w, x.dtype)
    check_float("x", x, x.dtype)
    check_aligned(K=x.shape[1], N=w.shape[2])
    return True


def experts_on_triton(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *others: torch.Tensor) -> bool:
    """For moe_experts (x = token rows) and expert_mlp (x = grouped rows)."""
    if not use_triton(x, w_up, w_down, *others):
        return False
    check_float("w_up", w_up, x.dtype)
    check_float("w_down", w_down, x.dtype)
    check_float("x", x, x.dtype)
    check_aligned(D=x.shape[1], H=w_down.shape[1])
    return True


def cross_entropy_on_triton(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> bool:
    if not use_triton(h, weight, targets):
        return False
    check_float("h", h, h.dtype)
    return True
