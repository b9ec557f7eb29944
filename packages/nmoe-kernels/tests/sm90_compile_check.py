"""Compile every Triton kernel of nmoe.kernels for sm_90 (Hopper) on a machine without a GPU (hand-run).

    uv run python packages/nmoe-kernels/tests/sm90_compile_check.py [--quick]

A stand-in Triton driver reports an sm_90 target, so `JITFunction.warmup` runs the whole compiler (TTIR ->
TTGIR -> LLVM -> PTX -> cubin with the ptxas that ships in the triton wheel) without launching. For every
autotune config of both grouped-GEMM variants ("pointer", "tma") and every specialization the library launches
it reports shared memory (H100 limit 227 KiB; larger configs are skipped by the autotuner) and whether the PTX
uses wgmma and TMA (cp.async.bulk.tensor). Compiling is not running: numerics are checked by the interpreter
tests and `gpu_check.py`. Relies on Triton's driver and warmup internals (checked with triton 3.6 and 3.9).
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

H100_SHARED_LIMIT = 232448  # bytes of shared memory per block on sm_90


class Sm90Driver:
    """Just enough of a Triton driver for compilation: device 0, stream 0, target sm_90."""

    backend = "cuda"

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


driver.set_active(Sm90Driver())

from nmoe.kernels import _kernels as K  # noqa: E402  (after the driver: importing builds nothing, but be safe)
from nmoe.kernels import _triton_ops as T  # noqa: E402

ROWS: list[dict] = []
M, E = 1024, 64


def empty(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype)


def compile_one(name: str, fn, args, constexprs: dict, num_warps: int, num_stages: int) -> None:
    try:
        kernel = fn.warmup(*args, grid=(1,), num_warps=num_warps, num_stages=num_stages, **constexprs)
        ptx = kernel.asm.get("ptx", "")
        shared = kernel.metadata.shared
        row = dict(kernel=name, ok=shared <= H100_SHARED_LIMIT, shared=shared)
        row.update(wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx)
    except Exception as err:
        row = dict(
            kernel=name,
            ok=False,
            error=" | ".join(str(err).splitlines()[-4:])[:400] + " | " + repr(err.__cause__)[:300],
        )
    ROWS.append(row)
    print(row, flush=True)


def gmm(mode, variant, trans, gather, f32_out, cfg, dtype):
    k, n = 1024, 704
    a = empty(M, k, dtype=dtype)
    w = empty(E, n, k, dtype=dtype) if trans else empty(E, k, 2 * n if mode == K.EPILOGUE_SWIGLU else n, dtype=dtype)
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    a_tma = variant == "tma" and not gather
    b_tma = variant == "tma"
    a_arg = TensorDescriptor.from_tensor(a, [bm, bk]) if a_tma else a
    b_arg = TensorDescriptor.from_tensor(w, [1, bn, bk] if trans else [1, bk, bn]) if b_tma else w
    out = empty(M, n, dtype=torch.float32 if f32_out else dtype)
    h = empty(M, 2 * n, dtype=dtype)
    idx, offsets = empty(M, dtype=torch.int32), empty(E, dtype=torch.int32)
    args = [a_arg, idx, b_arg, out, h, offsets, M, n, k, E]
    args += [k, 1, w.stride(0), 1, 1, out.stride(0), h.stride(0)]
    constexprs = dict(GATHER_A=gather, EPILOGUE=mode, UPCAST=False, BLOCK_E=E)
    constexprs.update(A_TMA=a_tma, B_TMA=b_tma, TRANS_B=trans, **cfg.kwargs)
    name = f"gmm[{variant}] mode={mode} trans={trans} gather={gather} {dtype} {bm}x{bn}x{bk} w{cfg.num_warps} s{cfg.num_stages}"
    compile_one(name, K.gmm_kernel, args, constexprs, cfg.num_warps, cfg.num_stages)


def dw(variant, cfg, dtype):
    ka, n = 1024, 704
    a, b = empty(M, ka, dtype=dtype), empty(M, n, dtype=dtype)
    bm, bka, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_KA"], cfg.kwargs["BLOCK_N"]
    tma = variant == "tma"
    a_arg = TensorDescriptor.from_tensor(a, [bm, bka]) if tma else a
    b_arg = TensorDescriptor.from_tensor(b, [bm, bn]) if tma else b
    out = empty(E, ka, n, dtype=dtype)
    offsets = empty(E, dtype=torch.int32)
    args = [a_arg, b_arg, a, b, out, offsets, ka, n, E, ka, 1, n, 1, out.stride(0), out.stride(1)]
    constexprs = dict(UPCAST=False, A_TMA=tma, B_TMA=tma, **cfg.kwargs)
    name = f"dw[{variant}] {dtype} {bm}x{bka}x{bn} w{cfg.num_warps} s{cfg.num_stages}"
    compile_one(name, K.gmm_dw_kernel, args, constexprs, cfg.num_warps, cfg.num_stages)


def gmm_fp8_tma(epilogue, blockwise, fast, cfg):
    """The fp8 grouped GEMM with TMA operands (A [M,K], B stored [E, out, K]), as _lowprec_ops.gemm launches it."""
    from nmoe.kernels import _lowprec_kernels as LK

    k, n = 1024, 704
    fp8 = torch.float8_e4m3fn
    out_cols = 2 * n if epilogue in (LK.EPILOGUE_SWIGLU_STORE, LK.EPILOGUE_SWIGLU_QUANT) else n
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    a_arg = TensorDescriptor.from_tensor(empty(M, k, dtype=fp8), [bm, bk])
    b_arg = TensorDescriptor.from_tensor(empty(E, out_cols, k, dtype=fp8), [1, bn, bk])
    f32 = empty(M, 8, dtype=torch.float32)
    out = empty(M, 2 * n if epilogue == LK.EPILOGUE_SWIGLU_BWD else n)
    h = empty(M, 2 * n)
    q = empty(M, n, dtype=fp8) if epilogue == LK.EPILOGUE_SWIGLU_QUANT else out
    offsets = empty(E, dtype=torch.int32)
    args = [a_arg, f32, b_arg, f32, out, h, q, f32, offsets, offsets, offsets, offsets, offsets]
    args += [M, n, k, E, k, 8, 1, out_cols * k, 1, k, 8, 8, 1]
    args += [out.stride(0), h.stride(0)]
    constexprs = dict(BLOCKWISE=blockwise, EPILOGUE=epilogue, UPCAST=False, FAST_ACC=fast, BLOCK_E=E, TMA=True)
    constexprs.update(cfg.kwargs)
    name = f"gmm_fp8[tma] epilogue={epilogue} blockwise={blockwise} fast={fast} {bm}x{bn}x{bk} w{cfg.num_warps} s{cfg.num_stages}"
    compile_one(name, LK.gmm_fp8_kernel, args, constexprs, cfg.num_warps, cfg.num_stages)


# (epilogue, transposed weights, gathered A, float32 out) as launched: grouped_mm fwd/dX, moe and expert_mlp up/down,
# and the experts' dgrad GEMMs into float32 d_act (moe_experts' gathers dy) before swiglu_bwd_rows
GMM_LAUNCHES = [
    (K.EPILOGUE_STORE, False, False, False),
    (K.EPILOGUE_STORE, True, False, False),
    (K.EPILOGUE_STORE, True, False, True),
    (K.EPILOGUE_STORE, True, True, True),
    (K.EPILOGUE_SWIGLU, False, True, False),
    (K.EPILOGUE_SWIGLU, False, False, False),
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="first autotune config of each kind only")
    args = parser.parse_args()
    for variant, gmm_cfgs, dw_cfgs in (
        ("pointer", T._GMM_CONFIGS, T._DW_CONFIGS),
        ("tma", T._GMM_TMA_CONFIGS, T._DW_TMA_CONFIGS),
    ):
        for mode, trans, gather, f32_out in GMM_LAUNCHES:
            for wide, dtype in ((False, torch.bfloat16), (True, torch.float32)):
                if f32_out and wide:
                    continue  # the same variant as the float32 run of the launch above it
                for cfg in gmm_cfgs[(mode, wide)][: 1 if args.quick else None]:
                    gmm(mode, variant, trans, gather, f32_out, cfg, dtype)
        for wide, dtype in ((False, torch.bfloat16), (True, torch.float32)):
            for cfg in dw_cfgs[wide][: 1 if args.quick else None]:
                dw(variant, cfg, dtype)
    from nmoe.kernels import _lowprec_kernels as LK
    from nmoe.kernels import _lowprec_ops as LO

    for epilogue, cfgs in LO._GMM_CONFIGS.items():
        for blockwise, fast in ((False, True), (True, False)):
            if (epilogue == LK.EPILOGUE_SWIGLU_QUANT) != blockwise and epilogue in (1, 3):
                continue  # SWIGLU_QUANT is the blockwise up GEMM, SWIGLU_STORE the rowwise one
            for cfg in cfgs[: 1 if args.quick else None]:
                gmm_fp8_tma(epilogue, blockwise, fast, cfg)
    logits, rows = empty(4096, 32768), empty(4096, dtype=torch.int64)
    ce_args = [logits, rows, empty(4096, dtype=torch.float32), empty(1, dtype=torch.float32), 32768, 32768, -100]
    compile_one("cross_entropy_rows", K.cross_entropy_rows_kernel, ce_args, dict(WITH_GRAD=True, BLOCK_V=4096), 8, 3)
    ids, hist = empty(600, dtype=torch.int32), empty(10, E + 1, dtype=torch.int32)
    compile_one("expert_histogram", K.expert_histogram_kernel, [ids, hist, 600, E], dict(BLOCK=64, BLOCK_E=128), 4, 3)
    scatter_args = [ids, hist, empty(600, dtype=torch.int64), ids, ids, 600, E]
    compile_one("expert_scatter", K.expert_scatter_kernel, scatter_args, dict(TOP_K=6, BLOCK=64), 4, 3)
    offsets = empty(E, dtype=torch.int32)
    combine_args = [empty(600, 1024), ids, empty(600, dtype=torch.float32), empty(100, 1024), offsets[-1:]]
    combine_args += [100, 1024, 1024, 1024]
    constexprs = dict(TOP_K=6, WEIGHTED=True, BLOCK_T=16, BLOCK_D=256)
    compile_one("combine", K.combine_kernel, combine_args, constexprs, 4, 3)
    gather_args = [empty(100, 1024), ids, empty(600, dtype=torch.float32), empty(600, dtype=torch.int64)]
    gather_args += [empty(600, 1024), 600, 1024, 1024, 1024]
    for scale in (False, True):
        constexprs = dict(SCALE=scale, BLOCK_R=4, BLOCK_D=1024)
        compile_one(f"gather_rows scale={scale}", K.gather_rows_kernel, gather_args, constexprs, 4, 3)
    print(f"\ntriton {triton.__version__}, target sm_90")
    print("| kernel | ok | shared KiB | wgmma | TMA |")
    print("| --- | --- | --- | --- | --- |")
    for r in ROWS:
        if "error" in r:
            print(f"| {r['kernel']} | ERROR {r['error'][:160]} | | | |")
        else:
            print(
                f"| {r['kernel']} | {'yes' if r['ok'] else 'NO'} | {r['shared'] / 1024:.0f} | {r['wgmma']} | {r['tma']} |"
            )
    failed = [r for r in ROWS if not r["ok"]]
    print(f"sm90_compile_check: {len(ROWS) - len(failed)}/{len(ROWS)} compiled within the shared-memory limit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
