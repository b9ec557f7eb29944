"""nmoe.kernels: grouped GEMM, expert routing, the fused MoE expert path and the fused output-head loss.

CUDA tensors (sm_90 / sm_100) run Triton kernels; CPU tensors run `nmoe.kernels.reference`. The ops are
torch.library custom ops (namespace "nmoe"), so torch.compile(fullgraph=True) traces them without a break.
Low precision (FP8 grouped GEMMs, NVFP4 storage and its fused AdamW): `nmoe.kernels.lowprec`.
"""

from nmoe.kernels.api import expert_mlp, grouped_mm, linear_cross_entropy, moe_experts, sort_by_expert
from nmoe.kernels.capacity import drop_over_capacity, expert_capacity, rank_in_expert
from nmoe.kernels.errors import UnsupportedInput
from nmoe.kernels.lowprec import (
    NVFP4Tensor,
    NVFP4UpdateStats,
    check_precision_supported,
    dequantize_nvfp4,
    expert_mlp_fp8,
    expert_param_bytes,
    grouped_mm_fp8,
    moe_experts_fp8,
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
    "expert_mlp",
    "linear_cross_entropy",
    "ExpertSort",
    "UnsupportedInput",
    "drop_over_capacity",
    "expert_capacity",
    "rank_in_expert",
    "NVFP4Tensor",
    "NVFP4UpdateStats",
    "check_precision_supported",
    "dequantize_nvfp4",
    "expert_mlp_fp8",
    "moe_experts_fp8",
    "expert_param_bytes",
    "grouped_mm_fp8",
    "nvfp4_adamw_",
    "quantize_fp8_blockwise",
    "quantize_fp8_rowwise",
    "quantize_nvfp4",
]
