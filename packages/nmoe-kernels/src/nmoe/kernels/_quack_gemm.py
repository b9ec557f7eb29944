"""quack's warp-specialised sm_90 grouped GEMM (CuTe DSL) for the routed fp8 layer's two GEMMs that gather rows.

Optional: it runs only where quack (with the CUTLASS DSL) is installed, see INSTALL. The up GEMM and the
dgrad-down GEMM read their rows through the routing (row r is token[r]), which no CUTLASS operand can do on Hopper
with TMA; quack's kernel gathers with cp.async producer warps. With the epilogue of `_quack_epilogue` and Hopper's
fast fp8 accumulation it is bit-identical to gmm_fp8_kernel (gpu_lowprec.py compares them), and 1.2-1.3x faster at
moonlet's shapes on an H100 (bench/RESULTS.md).
"""

from __future__ import annotations

import functools
import inspect

import torch

INSTALL = (
    "install nmoe-kernels' quack extra: pip install 'quack-kernels==0.6.5' 'nvidia-cutlass-dsl[cu13]==4.7.0' "
    "'apache-tvm-ffi>=0.1.15,<0.2' (or 'nmoe-kernels[quack]')"
)
# 128 x 256 tiles, one consumer warpgroup pair cooperating, clusters of two along M: the fastest of nine configs for
# both gathering GEMMs at moonlet's shapes (H100, bench/results/device_97_probe_quack.log)
CONFIG = dict(tile_m=128, tile_n=256, pingpong=False, cluster_m=2, cluster_n=1, is_dynamic_persistent=False)


@functools.cache
def load():
    """(quack's epilogue mod, its GemmConfig) with fast accumulation installed (see `_quack_epilogue`); ImportError
    when quack is missing or is not the version whose GemmSm90 takes fp8_fast_accum."""
    import quack.gemm_sm90 as sm90
    from quack.gemm_config import GemmConfig

    if "fp8_fast_accum" not in inspect.signature(sm90.GemmSm90.__init__).parameters:
        raise ImportError("this quack's GemmSm90 takes no fp8_fast_accum (nmoe is built against quack-kernels 0.6.5)")
    from nmoe.kernels._quack_epilogue import rowwise_scaled

    return rowwise_scaled, GemmConfig(**CONFIG)


@functools.cache
def missing() -> str:
    """Why quack cannot be used here ('' when it can): not installed, or an install that fails to load."""
    try:
        load()
    except Exception as err:  # a broken install (DSL, driver, another version) must not stop the layer: say why
        return f"quack does not load ({type(err).__name__}: {err}); {INSTALL}"
    return ""


def gathered_gemm(qa, sa, token, b_kn, col_scales, offsets, out) -> None:
    """out[r] = bf16((qa[token[r]] @ b_kn[e]) * sa[token[r]] * col_scales[e]) for the grouped rows r of each expert e
    (offsets[E] int32 ends), Hopper fast accumulation; rows from offsets[-1] on are left as they were.
    qa [T,K] e4m3, sa [T] float32, token [M] int32, b_kn [E,K,N] e4m3 with K contiguous, col_scales [E,N] float32,
    out [M,N] bf16."""
    mod, config = load()
    cu_seqlens = torch.cat([offsets.new_zeros(1), offsets])
    mod(qa, b_kn, out={"D": out}, config=config, tuned=False, cu_seqlens_m=cu_seqlens, A_idx=token,
        row_scale=sa.index_select(0, token), col_scale=col_scales)  # fmt: skip
