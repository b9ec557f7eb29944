"""Compile every low-precision Triton kernel variant for sm_90 (and sm_100) without a GPU (not collected by pytest).

    uv run python packages/nmoe-kernels/tests/compile_lowprec.py [--arch 90] [--quick]

The Triton interpreter runs the kernels' Python, not the compiler: it accepts code that fails to lower
(globals, dtype rules, layouts). This builds each launched (constexpr, dtype, config) combination to a
cubin with the ptxas shipped in the triton wheel and prints register / shared-memory use per variant.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nmoe.kernels import _lowprec_kernels as K  # noqa: E402
from nmoe.kernels import _lowprec_ops as ops  # noqa: E402
from nmoe.kernels import _triton_ops as T  # noqa: E402

DIV16 = {"N", "K", "C", "KA", "R"} | {
    f"stride_{s}" for s in ("am", "sam", "be", "bn", "sbe", "cm", "hm", "a", "b", "oe")
}
DIV16 |= {f"stride_{s}" for s in ("ok", "xm", "qm", "qt", "we", "wr", "wc", "qe", "qc", "se", "wk", "wn")}


def compile_variant(fn, types: dict[str, str], constants: dict, config: dict, target: GPUTarget):
    """types: argument -> Triton type ('*bf16', 'i32', ...); constants: constexpr / specialised (=1) arguments."""
    signature = {name: ("constexpr" if name in constants else types[name]) for name in fn.arg_names}
    missing = [n for n, t in signature.items() if t is None]
    if missing:
        raise ValueError(f"no type for {missing}")
    # what the runtime JIT infers at real shapes: 16-byte aligned tensors, strides and feature dims % 16 == 0
    aligned = [i for i, n in enumerate(fn.arg_names) if n in types and (types[n].startswith("*") or n in DIV16)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(constants), attrs=attrs)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options(config)
    return triton.compile(src, target=target, options=options.__dict__)


def resource_usage(kernel) -> str:
    """'REG:.. STACK:..' of the compiled cubin, from the cuobjdump shipped with triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs={fields[1]} stack={fields[2]}" if fields else "regs=?"


def gmm_variants(quick: bool):
    base = {
        **dict.fromkeys(("a_ptr", "b_ptr"), "*fp8e4nv"),
        **dict.fromkeys(("sa_ptr", "sb_ptr"), "*fp32"),
        **dict.fromkeys(("offsets_ptr", "a_idx_ptr", "wts_ptr", "w_idx_ptr", "dw_ptr"), "*i32"),
        **dict.fromkeys(
            (
                "M",
                "N",
                "K",
                "E",
                "stride_am",
                "stride_sam",
                "stride_sak",
                "stride_be",
                "stride_sbe",
                "stride_sbk",
                "stride_sbn",
                "stride_cm",
                "stride_hm",
                "stride_bn",
            ),
            "i32",
        ),
    }
    for epilogue, configs in ops._GMM_CONFIGS.items():
        for blockwise, fast in ((False, False), (False, True), (True, False)):
            if epilogue == K.EPILOGUE_SWIGLU_QUANT and not blockwise:
                continue
            # gathered rows (moe_experts_fp8: the up GEMM, and the weighted SwiGLU backward) on bf16 activations
            for out, gather in (("bf16", False), ("fp32", False), ("bf16", True)):
                if gather and epilogue == K.EPILOGUE_STORE:
                    continue
                types = dict(base, c_ptr=f"*{out}", h_ptr="*i32", q_ptr="*i32", sq_ptr="*i32")
                if gather:
                    types.update(a_idx_ptr="*i32", wts_ptr="*fp32", w_idx_ptr="*i64", dw_ptr="*fp32")
                if epilogue != K.EPILOGUE_STORE:
                    types.update(h_ptr=f"*{out}")
                if epilogue == K.EPILOGUE_SWIGLU_QUANT:
                    types.update(q_ptr="*fp8e4nv", sq_ptr="*fp32")
                if epilogue == K.EPILOGUE_SWIGLU_STORE and blockwise:
                    continue  # blockwise writes act quantised (EPILOGUE_SWIGLU_QUANT)
                constants = dict(
                    stride_bk=1,
                    BLOCKWISE=blockwise,
                    EPILOGUE=epilogue,
                    UPCAST=False,
                    FAST_ACC=fast,
                    BLOCK_E=64,
                    TMA=False,
                    GATHER_A=gather,
                    WEIGHTED=gather and epilogue == K.EPILOGUE_SWIGLU_BWD,
                )
                for cfg in configs[:1] if quick else configs:
                    yield (
                        f"gmm_fp8 epilogue={epilogue} blockwise={blockwise} fast={fast} out={out} gather={gather} "
                        f"{cfg.kwargs}",
                        K.gmm_fp8_kernel,
                        types,
                        {**constants, **cfg.kwargs},
                        dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                    )


def dw_variants(quick: bool):
    types = {
        **dict.fromkeys(("a_ptr", "b_ptr"), "*fp8e4nv"),
        **dict.fromkeys(("sa_ptr", "sb_ptr"), "*fp32"),
        "offsets_ptr": "*i32",
        **dict.fromkeys(("KA", "N", "E", "stride_a", "stride_b", "stride_oe", "stride_ok"), "i32"),
    }
    for out in ("bf16", "fp32"):
        for expert_scales, fast in ((False, False), (True, False), (True, True)):
            for cfg in ops._DW_CONFIGS[:1] if quick else ops._DW_CONFIGS:
                yield (
                    f"gmm_fp8_dw out={out} expert_scales={expert_scales} fast={fast} {cfg.kwargs}",
                    K.gmm_fp8_dw_kernel,
                    dict(types, out_ptr=f"*{out}"),
                    dict(UPCAST=False, BLOCK_E=256, EXPERT_SCALES=expert_scales, FAST_ACC=fast, **cfg.kwargs),
                    dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                )


def quantiser_variants():
    exact = dict(num_warps=4, num_stages=1, enable_fp_fusion=False)
    for src in ("bf16", "fp32"):
        ints = dict.fromkeys(("M", "C", "E", "stride_xm", "stride_qm", "stride_sm", "stride_cse"), "i32")
        ptrs = dict(x_ptr=f"*{src}", q_ptr="*fp8e4nv", s_ptr="*fp32", cs_ptr="*fp32", offsets_ptr="*i32")
        for blockwise, one_pass in ((False, False), (False, True), (True, False)):
            for swiglu in (False, True):
                # one pass: moonlet's rows (x 1024, act 704, d_pre 1408) at the launcher's rows per program and parts
                for width in (1024, 704, 1408) if one_pass else (0,):
                    for fold in (False, True) if not blockwise and width in (0, 704) else (False,):  # act's fold
                        elements = ops.ONE_PASS_ELEMENTS_FOLD if fold else ops.ONE_PASS_ELEMENTS
                        block_c, *parts = ops.pow2_parts(width) if one_pass else (128, 0, 0, 0)
                        per_row = width * (2 if swiglu and not fold else 1)  # as quantize_rows counts
                        block_m = ops._prev_power_of_2(elements // per_row) if one_pass else 32
                        yield (
                            f"fp8_quant_rows src={src} blockwise={blockwise} one_pass={one_pass} swiglu={swiglu} "
                            f"width={width} fold={fold}",
                            K.fp8_quant_rows_kernel,
                            dict(ints, **ptrs),
                            dict(
                                SWIGLU_INPUT=swiglu,
                                BLOCKWISE=blockwise,
                                ONE_PASS=one_pass,
                                BLOCK_M=block_m,
                                BLOCK_C=block_c,
                                **dict(zip(("PART1", "PART2", "PART3"), parts)),
                                FOLD=fold,
                                BLOCK_E=64 if fold else 1,
                            ),
                            exact,
                        )
            yield (
                f"fp8_quant_grouped_cols src={src} swiglu={blockwise}",
                K.fp8_quant_grouped_cols_kernel,
                dict(
                    x_ptr=f"*{src}",
                    qt_ptr="*fp8e4nv",
                    s_ptr="*fp32",
                    offsets_ptr="*i32",
                    **dict.fromkeys(("M", "C", "E", "stride_xm", "stride_qt"), "i32"),
                ),
                dict(SWIGLU_INPUT=blockwise, BLOCK_C=ops.QUANT_COLS, BLOCK_E=256),
                exact,
            )
        for weighted, quantize, fold, store in ((False, False, False, True), (True, False, False, True),
                                                (False, True, True, True), (True, True, True, True),
                                                (True, True, True, False)):  # fmt: skip
            for hidden in (704, 512):  # moonlet's and speedrun-256's H, at the launcher's rows per program and parts
                block_c, *parts = ops.pow2_parts(hidden)
                yield (
                    f"swiglu_bwd_rows pre={src} weighted={weighted} quantize={quantize} fold={fold} store={store} "
                    f"H={hidden}",
                    K.swiglu_bwd_rows_kernel,
                    dict(
                        dact_ptr="*fp32",
                        pre_ptr=f"*{src}",
                        dpre_ptr=f"*{src}",
                        q_ptr="*fp8e4nv",
                        s_ptr="*fp32",
                        wts_ptr="*fp32",
                        w_idx_ptr="*i64",
                        dw_ptr="*fp32",
                        offsets_ptr="*i32",
                        cs_ptr="*fp32",
                        **dict.fromkeys(
                            ("M", "H", "E", "stride_dm", "stride_pm", "stride_dpm", "stride_qm", "stride_cse"), "i32"
                        ),
                    ),
                    dict(
                        WEIGHTED=weighted,
                        QUANTIZE=quantize,
                        FOLD=fold,
                        STORE=store,
                        BLOCK_E=256 if fold else 1,
                        BLOCK_M=ops._prev_power_of_2(T.SWIGLU_BWD_ELEMENTS // (2 * hidden)),
                        BLOCK_C=block_c,
                        **dict(zip(("PART1", "PART2", "PART3"), parts)),
                    ),
                    exact,
                )
        weight_ints = ("R", "C", "stride_we", "stride_wr", "stride_wc", "stride_qe", "stride_qr", "stride_qc")
        # one pass: w_up's and w_down's slabs; both: w_up's, writing its codes in both layouts
        for one_pass, rows, both in ((False, 0, False), (True, 1024, False), (True, 704, False), (True, 1024, True)):
            block_r, *parts = ops.pow2_parts(rows) if one_pass else (ops.QUANT_COLS, 0, 0, 0)
            codes = "*i32" if both else "*fp8e4nv"
            yield (
                f"fp8_quant_weight_rowwise src={src} one_pass={one_pass} rows={rows} both={both}",
                K.fp8_quant_weight_rowwise_kernel,
                dict(
                    w_ptr=f"*{src}",
                    q_ptr=codes,
                    q2_ptr=codes,
                    s_ptr="*fp32",
                    **dict.fromkeys(weight_ints + ("stride_se",), "i32"),
                ),
                dict(
                    ONE_PASS=one_pass,
                    BOTH=both,
                    BLOCK_R=block_r,
                    BLOCK_C=ops._prev_power_of_2(ops.ONE_PASS_SLAB // rows) if one_pass else ops.QUANT_COLS,
                    **dict(zip(("PART1", "PART2", "PART3"), parts)),
                    stride_wc=1,  # as the forward copy launches it: w contiguous along C, q (transposed) along R
                    stride_qr=1,
                ),
                dict(exact, num_warps=ops.WEIGHT_WARPS if one_pass else 4),
            )
        if src == "fp32":  # the codes' transposed copies (int32 words of four codes)
            yield (
                "fp8_transpose",
                K.fp8_transpose_kernel,
                dict(q_ptr="*i32", qt_ptr="*i32", K="i32", N="i32"),
                dict(BLOCK_K=ops.TRANSPOSE_BLOCK, BLOCK_N=ops.TRANSPOSE_BLOCK),
                dict(num_warps=4, num_stages=1),
            )
            yield (
                "fp8_transpose_grouped",
                K.fp8_transpose_grouped_kernel,
                dict(q_ptr="*i32", qt_ptr="*i32", offsets_ptr="*i32", M="i32", C="i32", E="i32", stride_qt_words="i32"),
                dict(BLOCK_C=ops.GROUPED_TRANSPOSE_COLS, BLOCK_E=256),
                dict(num_warps=4, num_stages=1),
            )
            yield (
                "revive_dead_slices",
                K.revive_dead_slices_kernel,
                dict(s_ptr="*fp32", S="i32"),
                dict(BLOCK_S=2048),
                dict(num_warps=4, num_stages=1),
            )
        dw_cols = itertools.product(
            ((False, False, False, False), (True, True, True, True), (True, True, False, True),
             (False, True, False, True)), (1, 2), (0,)
        )  # fmt: skip
        # the routed token-order amax pass (moonlet's top_k): codes times their token's largest row factor, as the
        # routed dW's dy (weighted) and x operands read them
        routed = (((False, True, True, True), 1, 6), ((False, True, False, True), 1, 6))
        for (gather, mult, weighted, codes), phase, top_k in (*dw_cols, *routed):
            x_scales = codes
            yield (
                f"fp8_quant_dw_cols src={src} gather={gather} mult={mult} weighted={weighted} codes={codes} "
                f"x_scales={x_scales} phase={phase} top_k={top_k}",
                K.fp8_quant_dw_cols_kernel,
                dict(
                    x_ptr="*fp8e4nv" if codes else f"*{src}",
                    idx_ptr="*i32",
                    xs_ptr="*fp32",
                    mult_ptr="*fp32",
                    wts_ptr=f"*{src}",
                    w_idx_ptr="*i64",
                    qt_ptr="*i32",
                    s_ptr="*fp32",
                    amax_ptr="*i32",
                    offsets_ptr="*i32",
                    **dict.fromkeys(("M", "C", "E", "stride_xm", "stride_qt_words"), "i32"),
                ),
                dict(
                    GATHER=gather,
                    X_SCALES=x_scales,
                    MULT=mult,
                    WEIGHTED=weighted,
                    BLOCK_C=ops.DW_COLS_BLOCK,
                    BLOCK_E=256,
                    PHASE=phase,
                    TOP_K=top_k,
                ),
                exact,
            )
        for write_q in (False, True):
            yield (
                f"fp8_quant_weight_blockwise src={src} write_q={write_q}",
                K.fp8_quant_weight_blockwise_kernel,
                dict(
                    w_ptr=f"*{src}",
                    q_ptr="*fp8e4nv",
                    qt_ptr="*fp8e4nv",
                    s_ptr="*fp32",
                    **dict.fromkeys(("K", "N", "stride_we", "stride_wk", "stride_wn"), "i32"),
                ),
                dict(WRITE_Q=write_q, WRITE_QT=not write_q),
                exact,
            )
        yield (
            f"nvfp4_quantize src={src}",
            K.nvfp4_quantize_kernel,
            dict(w_ptr=f"*{src}", codes_ptr="*u8", scales_ptr="*fp8e4nv", st_ptr="*fp32", n_blocks="i32"),
            dict(BLOCK_B=ops.NVFP4_BLOCKS),
            exact,
        )
        yield (
            f"nvfp4_dequantize out={src}",
            K.nvfp4_dequantize_kernel,
            dict(codes_ptr="*u8", scales_ptr="*fp8e4nv", st_ptr="*fp32", out_ptr=f"*{src}", n_blocks="i32"),
            dict(BLOCK_B=ops.NVFP4_BLOCKS),
            exact,
        )
    floats = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "step_size", "inv_sqrt_bc2")
    for rule in range(4):
        for grad in ("bf16", "fp32"):
            yield (
                f"nvfp4_adamw rule={rule} grad={grad}",
                K.nvfp4_adamw_kernel,
                dict(
                    codes_ptr="*u8",
                    scales_ptr="*fp8e4nv",
                    st_dec_ptr="*fp32",
                    st_enc_ptr="*fp32",
                    grad_ptr=f"*{grad}",
                    m_ptr="*fp32",
                    v_ptr="*fp32",
                    r_ptr="*bf16" if rule == K.RULE_RESIDUAL else f"*{grad}",
                    flips_ptr="*i32",
                    sq_err_ptr="*fp32",
                    sq_norm_ptr="*fp32",
                    sat_ptr="*i32",
                    n_blocks="i32",
                    key="i32",
                    **dict.fromkeys(floats + ("eps", "decay", "dither"), "fp32"),
                ),
                dict(RULE=rule, BLOCK_B=ops.NVFP4_ADAMW_BLOCKS),
                exact,
            )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true", help="first autotune config of each GEMM only")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    variants = [*gmm_variants(args.quick), *dw_variants(args.quick), *quantiser_variants()]
    start = time.time()
    for name, fn, types, constants, config in variants:
        t0 = time.time()
        try:
            kernel = compile_variant(fn, types, constants, config, target)
            print(f"ok   {time.time() - t0:5.1f}s smem={kernel.metadata.shared} {resource_usage(kernel)} {name}")
        except Exception as err:
            failures += 1
            print(f"FAIL {name}: {type(err).__name__}: {str(err)[:1500]}")
    print(
        f"{len(variants) - failures}/{len(variants)} variants compiled for sm_{args.arch} in {time.time() - start:.0f}s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
