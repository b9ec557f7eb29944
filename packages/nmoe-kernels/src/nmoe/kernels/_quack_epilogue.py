"""The epilogue of the quack GEMM that `_quack_gemm` runs (imported only when quack is installed): a module-level
EpiMod, so quack can fingerprint it and re-mint its kernel class by import."""

from __future__ import annotations

from quack.epilogue.frontend import gemm_epilogue


@gemm_epilogue()
def rowwise_scaled(acc, row_scale, col_scale):
    """bf16 D = (acc * row_scale[row]) * col_scale[expert, column], in gmm_fp8_kernel's order of the products."""
    return {"D": acc * row_scale * col_scale}
