"""The epilogue of the quack GEMM that `_quack_gemm` runs (imported only when quack is installed): a module-level
EpiMod, so quack can fingerprint it and re-mint its kernel class by import. Importing this module also installs
fast fp8 accumulation for that class and adds nmoe's kernel sources to quack's compile-cache fingerprint, so no
kernel of this epilogue is ever compiled, or loaded from quack's disk cache, without them."""

from __future__ import annotations

from pathlib import Path

import quack.cache
import quack.gemm_sm90
from quack.epilogue.frontend import gemm_epilogue

from nmoe.kernels._quack_fast_accum import fast_accumulation_init


@gemm_epilogue()
def rowwise_scaled(acc, row_scale, col_scale):
    """bf16 D = (acc * row_scale[row]) * col_scale[expert, column], in gmm_fp8_kernel's order of the products."""
    return {"D": acc * row_scale * col_scale}


_SOURCES = Path(__file__).resolve().parent
if _SOURCES not in quack.cache.EXTRA_SOURCE_DIRS:
    quack.cache.EXTRA_SOURCE_DIRS.append(_SOURCES)
if getattr(quack.gemm_sm90.GemmSm90.__init__, "nmoe_fast_accumulation_for", None) is not rowwise_scaled.fn:
    quack.gemm_sm90.GemmSm90.__init__ = fast_accumulation_init(quack.gemm_sm90.GemmSm90.__init__, rowwise_scaled.fn)
