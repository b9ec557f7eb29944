"""nmoe.kernels: grouped GEMM, expert routing and the fused MoE expert path.

CUDA tensors (sm_90 / sm_100) run Triton kernels; CPU tensors run `nmoe.kernels.reference`.
Low precision (FP8 grouped GEMMs, NVFP4 storage and its fused AdamW): `nmoe.kernels.lowprec`.
"""

from nmoe.kernels.api import grouped_mm, moe_experts, sort_by_expert
from nmoe.kernels.errors import UnsupportedInput
from nmoe.kernels.lowprec import (
    NVFP4Tensor,
    NVFP4UpdateStats,
    check_precision_supported,
    dequantize_nvfp4,
    expert_mlp_fp8,
    expert_param_bytes,
    grouped_mm_fp8,
    nvfp4_adamw_,
    quantize_fp8_blockwise,
    quantize_fp8_rowwise,
    quantize_nvfp4,
)
from nmoe.kernels.reference import ExpertSort

__all__ = [
    "grouped_mm",
    "sort_by_expert",
    "moe_experts",
    "ExpertSort",
    "UnsupportedInput",
    "NVFP4Tensor",
    "NVFP4UpdateStats",
    "check_precision_supported",
    "dequantize_nvfp4",
    "expert_mlp_fp8",
    "expert_param_bytes",
    "grouped_mm_fp8",
    "nvfp4_adamw_",
    "quantize_fp8_blockwise",
    "quantize_fp8_rowwise",
    "quantize_nvfp4",
]
