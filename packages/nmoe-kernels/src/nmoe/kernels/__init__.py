"""nmoe.kernels: grouped GEMM, expert routing and the fused MoE expert path.

CUDA tensors (sm_90 / sm_100) run Triton kernels; CPU tensors run `nmoe.kernels.reference`.
"""

from nmoe.kernels.api import grouped_mm, moe_experts, sort_by_expert
from nmoe.kernels.capacity import drop_over_capacity, expert_capacity, rank_in_expert
from nmoe.kernels.errors import UnsupportedInput
from nmoe.kernels.reference import ExpertSort

__all__ = [
    "grouped_mm",
    "sort_by_expert",
    "moe_experts",
    "ExpertSort",
    "UnsupportedInput",
    "drop_over_capacity",
    "expert_capacity",
    "rank_in_expert",
]
