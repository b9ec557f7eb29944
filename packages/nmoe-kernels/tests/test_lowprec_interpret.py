"""Every low-precision Triton kernel, run on CPU by the Triton interpreter, against reference_lowprec:
bit for bit for the quantisers and the NVFP4 AdamW, float64 of the same quantised math for the fp8 GEMMs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nmoe.kernels as nk
from nmoe.kernels import reference_lowprec as R
from nmoe.kernels.reference import grouped_mm, swiglu
from nmoe.kernels.reference import moe_experts as moe_experts_ref

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nmoe.kernels._lowprec_kernels import _e2m1_round  # noqa: E402


@triton.jit
def round_kernel(y_ptr, bits_ptr, codes_ptr, values_ptr, n, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """_e2m1_round over a vector (test harness)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    codes, values = _e2m1_round(
        tl.load(y_ptr + i, mask=ok, other=0.0), tl.load(bits_ptr + i, mask=ok, other=0), STOCHASTIC
    )
    tl.store(codes_ptr + i, codes, mask=ok)
    tl.store(values_ptr + i, values, mask=ok)


_INT_VIEW = {torch.float8_e4m3fn: torch.uint8, torch.bfloat16: torch.int16, torch.float32: torch.int32}
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
magnitudes = st.sampled_from([1e-3, 0.02, 1.0, 300.0])


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("NMOE_KERNELS_FORCE_TRITON", "1")
    from nmoe.kernels import _lowprec_ops

    assert _lowprec_ops.INTERPRET, "nmoe.kernels._lowprec_ops was imported before TRITON_INTERPRET=1 was set"


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, so that equality is bitwise."""
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def assert_bitwise(got, want, name=""):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert torch.equal(bits(got), bits(want)), f"{name}: {int((bits(got) != bits(want)).sum())} elements differ"


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def adamw_state(shape, seed, rule="nearest"):
    g = torch.Generator().manual_seed(seed)
    q = R.quantize_nvfp4(torch.randn(shape, generator=g) * 0.02)
    residual = torch.zeros(shape, dtype=torch.bfloat16) if rule == "residual" else None
    return q, torch.zeros(shape), torch.zeros(shape), residual, g


def clone_q(q):
    return R.NVFP4Tensor(*(t.clone() for t in q))


@settings(max_examples=6, deadline=None)
@given(
    st.sampled_from([(3, 48), (2, 5, 64), (70, 16)]),
    st.sampled_from([torch.float32, torch.bfloat16]),
    magnitudes,
    st.integers(0, 2**31 - 1),
)
def test_nvfp4_quantise_and_dequantise_kernels_are_bitwise(shape, dtype, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * magnitude).to(dtype)
    w.view(-1, 16)[0] = 0
    got, want = nk.quantize_nvfp4(w), R.quantize_nvfp4(w)
    for name, a, b in zip(got._fields, got, want):
        assert_bitwise(a, b, name)
    for out in (torch.bfloat16, torch.float32):
        assert_bitwise(nk.dequantize_nvfp4(got, out), R.dequantize_nvfp4(want, out), str(out))


@pytest.mark.parametrize("one_pass", [True, False])
def test_fp8_quantiser_kernels_are_bitwise(one_pass, monkeypatch):
    from nmoe.kernels import _lowprec_ops

    if not one_pass:  # rows and weight slabs too long for registers: the two-pass kernels (amax, then quantise)
        monkeypatch.setattr(_lowprec_ops, "ONE_PASS_ELEMENTS", 16)
        monkeypatch.setattr(_lowprec_ops, "ONE_PASS_ELEMENTS_FOLD", 16)
        monkeypatch.setattr(_lowprec_ops, "ONE_PASS_SLAB", 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 200, generator=g) * torch.logspace(-3, 2, 70)[:, None]
    x[3] = 0
    x4 = torch.randn(9, 232, generator=g)  # 232 -> four one-pass parts, 128 + 64 + 32 + 16 (8 masked)
    for fn, ref in (
        (nk.quantize_fp8_rowwise, R.quantize_fp8_rowwise),
        (nk.quantize_fp8_blockwise, R.quantize_fp8_blockwise),
    ):
        for rows in (x, x4):
            for a, b in zip(fn(rows), ref(rows)):
                assert_bitwise(a, b, fn.__name__)
            for a, b in zip(fn(rows.bfloat16()), ref(rows.bfloat16())):
                assert_bitwise(a, b, fn.__name__ + " bf16")
    pre = torch.randn(70, 2 * 96, generator=g)  # gate | up -> rowwise quantised silu(gate) * up
    q, scale = _lowprec_ops.quantize_rows(pre, False, swiglu_input=True)
    q_ref, scale_ref = R.quantize_fp8_rowwise(R.swiglu_f32(pre))
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)  # silu's float32 formula differs by an ulp
    assert (bits(q) != bits(q_ref)).float().mean() < 0.01
    w = torch.randn(3, 200, 144, generator=g)
    # 176 = 128 + 32 + 16 rows: the one-pass slab in three power-of-two parts (200 is padded: two passes)
    for weight in (w, torch.randn(2, 176, 40, generator=g)):
        for dim in (1, 2):
            for a, b in zip(nk.quantize_fp8_rowwise(weight, dim), R.quantize_fp8_rowwise(weight, dim)):
                assert_bitwise(a, b, f"weight {tuple(weight.shape)} rowwise dim {dim}")
    for a, b in zip(
        nk.quantize_fp8_blockwise(w.transpose(1, 2)), R.quantize_fp8_blockwise(w.transpose(1, 2), (128, 128))
    ):
        assert_bitwise(a.contiguous(), b.contiguous(), "weight blockwise (strided input)")
    dead = w.clone()
    dead[1, 7, :], dead[2, :, 5] = 0, 0  # all-zero slices along both axes
    # one quantisation, both GEMM layouts; K = 128 (one pass): the w_up slab kernel writes both layouts itself
    for weight in (w, torch.randn(2, 176, 40, generator=g), dead, torch.randn(2, 128, 40, generator=g)):
        for fold_pass, scale_pass in (("dgrad", "fwd"), ("fwd", "dgrad")):
            q, qt, s = _lowprec_ops.quantize_weight_both(weight, False, fold_pass)
            q_ref, s_ref = R.quantize_weight(weight, "rowwise", scale_pass)
            assert_bitwise(q, q_ref, f"weight {tuple(weight.shape)} folded into {fold_pass}")
            assert_bitwise(qt, q_ref.transpose(1, 2).contiguous(), "its transposed copy")
            assert_bitwise(s, s_ref, "its scales")
    rows = torch.randn(200, 48, generator=g) * torch.logspace(-2, 1, 200)[:, None]
    offsets = torch.tensor([0, 130, 130, 197], dtype=torch.int32)  # an empty group, a 2-chunk group, 3 tail rows
    col_scales = torch.rand(4, 48, generator=g) + 0.01
    expert = torch.tensor([1] * 130 + [3] * 70)  # rows past offsets[-1] take the last expert's scales
    for a, b in zip(
        _lowprec_ops.quantize_rows(rows, False, fold=(col_scales, offsets)),
        R.quantize_fp8_rowwise(rows * col_scales[expert]),
    ):
        assert_bitwise(a, b, "rows with a weight's scales folded in")
    qt, s = _lowprec_ops.quantize_grouped_cols(rows, offsets)
    q_ref, s_ref = R.quantize_fp8_grouped_cols(rows, offsets)
    assert_bitwise(s, s_ref, "grouped-col scales")
    for cid, first, end in R.group_chunks(offsets):  # chunk c: columns [128c, 128c + 128), zero-padded
        slot = qt[:, 128 * cid : 128 * (cid + 1)].T
        assert_bitwise(slot[: end - first].contiguous(), q_ref[first:end], f"grouped-col codes, chunk {cid}")
        assert bits(slot[end - first :]).eq(0).all()


def test_fp8_quantisers_give_finite_codes_for_subnormal_and_underflowing_scales():
    """Slices whose amax / 448 is subnormal (1 / it would overflow float32) or underflows to 0: the scale is floored
    at MIN_SCALE, so the codes are finite (dividing by a zero scale gave 0 / 0 = NaN for the slice's zeros) and still
    decode to the values; kernels match the reference bit for bit (rows, the weight slab kernel, the dW column
    quantiser)."""
    from nmoe.kernels import _lowprec_ops

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=g)
    x[1] *= 1e-37  # normal values, amax / 448 subnormal
    x[2] *= 1e-41  # subnormal values
    x[3] = 0
    x[3, 7] = 1e-44  # amax / 448 underflows to 0
    for a, b in zip(nk.quantize_fp8_rowwise(x), R.quantize_fp8_rowwise(x)):
        assert_bitwise(a, b, "rows with tiny scales")
    q, scale = nk.quantize_fp8_rowwise(x)
    assert torch.isfinite(q.float()).all() and q[1].float().abs().amax() > 0 and scale.min() == R.MIN_SCALE
    error = (q.float() * scale[:, None] - x).abs()
    assert (error <= scale[:, None] * 0.5 * 2.0 ** (q.float().abs().log2().floor().clamp(min=-6) - 3)).all()
    w = x.T.reshape(2, 32, 6).contiguous()  # per-column scales over K = 32 (one pass): the tiny rows as columns
    for dim in (1, 2):
        for a, b in zip(nk.quantize_fp8_rowwise(w, dim), R.quantize_fp8_rowwise(w, dim)):
            assert_bitwise(a, b, f"weight slab with tiny scales, dim {dim}")
    cols = x.T[:, :4].contiguous()  # [64, 4]: the tiny rows as dW columns
    offsets = torch.tensor([20, 64], dtype=torch.int32)
    qt, s = _lowprec_ops.quantize_dw_cols(cols, offsets)
    q_ref, s_ref = R.quantize_fp8_dw_cols(cols, offsets)
    assert_bitwise(s, s_ref, "dW column scales, tiny columns")
    _chunk_slots(qt, offsets, q_ref, "dW column codes, tiny columns")


def _chunk_slots(qt: torch.Tensor, offsets: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """qt[C, chunks*128] holds want's grouped rows chunk by chunk, transposed and zero-padded (the dW layout)."""
    for cid, first, end in R.group_chunks(offsets):
        slot = qt[:, 128 * cid : 128 * (cid + 1)].T
        assert_bitwise(slot[: end - first].contiguous(), want[first:end], f"{what}, chunk {cid}")
        assert bits(slot[end - first :]).eq(0).all(), f"{what}: chunk {cid} is not zero-padded"


def _routing(n_tokens: int, top_k: int, g: torch.Generator, last_dropped: bool = False):
    """A routing's (order[R] int64: token slot of grouped row r, token[R] int32, pos[R] int32: grouped row of each
    slot), R = n_tokens * top_k; last_dropped: the last token's slots are the last grouped rows."""
    n = n_tokens * top_k
    kept = n - top_k if last_dropped else n
    order = torch.cat([torch.randperm(kept, generator=g), torch.arange(kept, n)])
    pos = torch.empty(n, dtype=torch.int32)
    pos[order] = torch.arange(n, dtype=torch.int32)
    return order, (order // top_k).to(torch.int32), pos


def test_dw_column_quantiser_and_grouped_transpose_match_the_reference():
    """The rowwise dW operands: codes per column, one scale shared by the experts (gathered, times a row multiplier
    and a routing weight, as the routed backward reads x and dy: the amax then comes from the token rows), and
    other rows' codes moved into the same chunk layout. Dropped tail rows count for nothing."""
    from nmoe.kernels import _lowprec_ops

    g = torch.Generator().manual_seed(5)
    offsets = torch.tensor([0, 130, 130, 197], dtype=torch.int32)  # empty groups, a 2-chunk group, 3 tail rows
    rows = torch.randn(200, 48, generator=g) * torch.logspace(-3, 1, 200)[:, None]
    rows[197:] = 1e6  # dropped: must not set a scale
    qt, s = _lowprec_ops.quantize_dw_cols(rows, offsets)
    q_ref, s_ref = R.quantize_fp8_dw_cols(rows, offsets)
    assert_bitwise(s, s_ref, "dW-col scales")
    assert torch.equal(s[0], torch.full((48,), R.ZERO_SLICE_SCALE)), "an empty group's scales"
    assert torch.equal(s[1], s[3]), "one scale per column, shared by the experts"
    _chunk_slots(qt, offsets, q_ref, "dW-col codes")

    # gathered as a routing of 67 tokens x top-3 reads them: the last token's 3 slots are the dropped rows
    offsets = torch.tensor([0, 130, 130, 198], dtype=torch.int32)
    x = torch.randn(67, 48, generator=g).to(torch.bfloat16)
    x[66] = 1e4  # a token only the dropped rows read
    w_idx, idx, pos = _routing(67, 3, g, last_dropped=True)
    mult = torch.rand(201, generator=g) * 1e-3
    weights = (torch.rand(201, generator=g) * 2 - 1).to(torch.bfloat16)  # negative too: amaxes of |values|
    factor = mult * weights[w_idx].float()  # each row's multipliers first, as the kernels
    qt, s = _lowprec_ops.quantize_dw_cols(x, offsets, idx, mult, weights, w_idx, pos=pos)
    q_ref, s_ref = R.quantize_fp8_dw_cols(x[idx.long()].float() * factor[:, None], offsets)
    assert_bitwise(s, s_ref, "gathered, multiplied, weighted dW-col scales")
    _chunk_slots(qt, offsets, q_ref, "gathered dW-col codes")

    # the last expert empty, 10 dropped slots at random: tokens that keep some of their slots and drop others
    t_offsets = torch.tensor([50, 50, 110, 110], dtype=torch.int32)
    t_order, t_idx, t_pos = _routing(40, 3, g)
    t_mult = torch.rand(120, generator=g)
    qt, s = _lowprec_ops.quantize_dw_cols(x[:40], t_offsets, t_idx, t_mult, weights[:120], t_order, pos=t_pos)
    t_factor = t_mult * weights[:120][t_order].float()
    q_ref, s_ref = R.quantize_fp8_dw_cols(x[:40][t_idx.long()].float() * t_factor[:, None], t_offsets)
    assert_bitwise(s, s_ref, "dW-col scales, partly dropped tokens, an empty last expert")
    assert torch.equal(s[3], torch.full((48,), R.ZERO_SLICE_SCALE)), "the empty last expert's scales"
    _chunk_slots(qt, t_offsets, q_ref, "dW-col codes, partly dropped tokens")
    dropped = t_order[110:] // 3  # the tokens of the dropped slots
    assert (torch.bincount(dropped) % 3 != 0).any(), "the case needs a token that keeps some slots and drops others"
    with pytest.raises(ValueError, match="pos"):
        _lowprec_ops.quantize_dw_cols(x[:40], t_offsets, t_idx, t_mult, pos=t_pos[:40])  # another top-k's pos

    codes, row_scales = R.quantize_fp8_rowwise(x)  # requantised codes, as the rowwise dW reads x and dy
    qt, s = _lowprec_ops.quantize_dw_cols(codes, offsets, idx, mult, weights, w_idx, row_scales, pos=pos)
    factor = row_scales[idx.long()] * mult * weights[w_idx].float()
    q_ref, s_ref = R.quantize_fp8_dw_cols(codes[idx.long()].float() * factor[:, None], offsets)
    assert_bitwise(s, s_ref, "dW-col scales of requantised codes")
    _chunk_slots(qt, offsets, q_ref, "requantised dW-col codes")

    q, _ = R.quantize_fp8_rowwise(rows)
    _chunk_slots(_lowprec_ops.transpose_grouped_codes(q, offsets), offsets, q, "grouped transpose")

    # groups of 1-3 rows and of exactly 128, C a multiple of 4 but not of 16 (a partial column block): the kernels
    # pack four rows per word, so every position of a group's end within a word matters
    offsets = torch.tensor([3, 4, 132, 134, 262], dtype=torch.int32)
    rows = torch.randn(262, 44, generator=g)
    qt, s = _lowprec_ops.quantize_dw_cols(rows, offsets)
    q_ref, s_ref = R.quantize_fp8_dw_cols(rows, offsets)
    assert_bitwise(s, s_ref, "dW-col scales, short groups")
    _chunk_slots(qt, offsets, q_ref, "dW-col codes, short groups")
    q, _ = R.quantize_fp8_rowwise(rows)
    _chunk_slots(_lowprec_ops.transpose_grouped_codes(q, offsets), offsets, q, "grouped transpose, short groups")
    codes, row_scales = R.quantize_fp8_rowwise(torch.randn(131, 44, generator=g))
    _, idx, pos = _routing(131, 2, g)
    mult = torch.rand(262, generator=g)
    qt, s = _lowprec_ops.quantize_dw_cols(codes, offsets, idx, mult, x_scales=row_scales, pos=pos)  # as _dw_up
    factor = row_scales[idx.long()] * mult
    q_ref, s_ref = R.quantize_fp8_dw_cols(codes[idx.long()].float() * factor[:, None], offsets)
    assert_bitwise(s, s_ref, "dW-col scales of requantised codes, short groups")
    _chunk_slots(qt, offsets, q_ref, "requantised dW-col codes, short groups")


def _rounding_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Every e2m1 tie and grid point with its float32 neighbours, both signs, beyond +-6, and random values; random
    bits with the extremes."""
    points = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 1e-30])
    near = torch.cat([points, torch.nextafter(points, points + 1), torch.nextafter(points, points - 1).abs()])
    g = torch.Generator().manual_seed(0)
    y = torch.cat([near, -near, torch.randn(4096, generator=g) * 3, torch.rand(4096, generator=g) * 1.2])
    y = y.repeat(3)
    u = torch.randint(0, 2**32, y.shape, generator=g, dtype=torch.int64)
    u[: y.numel() // 3] = 0
    u[y.numel() // 3 : 2 * y.numel() // 3 : 2] = 0xFFFFFFFF
    return y.float(), u


@pytest.mark.parametrize("stochastic", [False, True])
def test_e2m1_rounding_on_float_bits_matches_the_reference_rules(stochastic):
    y, u = _rounding_inputs()
    codes, values = torch.empty(y.shape, dtype=torch.uint8), torch.empty_like(y)
    u32 = u.to(torch.int64).to(torch.uint32) if hasattr(torch, "uint32") else u.to(torch.int32)
    round_kernel[(triton.cdiv(y.numel(), 1024),)](y, u32, codes, values, y.numel(), stochastic, 1024)
    want = R.e2m1_stochastic(y, (u & 0xFFFFFF).float() * R.f32(2.0**-24)) if stochastic else R.e2m1_encode(y)
    assert torch.equal(codes, want), f"{int((codes != want).sum())} codes differ"
    assert torch.equal(values, R.e2m1_decode(want))  # -0.0 == 0.0: a zero's sign carries no value


@pytest.mark.parametrize("rule", R.RULES)
def test_nvfp4_adamw_kernel_is_bitwise(rule):
    q, m, v, residual, g = adamw_state((7, 160), 10, rule=rule)  # 70 blocks: a partial program
    q_ref, m_ref, v_ref = clone_q(q), m.clone(), v.clone()
    r_ref = None if residual is None else residual.clone()
    assert R.stream_key(99, 1) < 2**31 <= R.stream_key(99, 3)  # both halves of the uint32 key range
    for step, dtype in ((1, torch.float32), (3, torch.bfloat16)):
        grad = torch.randn(7, 160, generator=g).to(dtype)
        kw = dict(step=step, **HYPER, rule=rule, seed=99, dither=0.25)
        got = nk.nvfp4_adamw_(q, grad, m, v, residual=residual, **kw)
        want = R.nvfp4_adamw_(q_ref, grad, m_ref, v_ref, residual=r_ref, **kw)
        for name, a, b in zip(q._fields, q, q_ref):
            assert_bitwise(a, b, f"step {step} {name}")
        assert_bitwise(m, m_ref, "exp_avg")
        assert_bitwise(v, v_ref, "exp_avg_sq")
        if residual is not None:
            assert_bitwise(residual, r_ref, "residual")
        assert got.flips.dtype == torch.int64 and got.flips.item() == want.flips.item()
        assert step > 1 or got.flips.item() > 0  # the first step moves codes under every rule
        assert got.saturated.item() == want.saturated.item()
        torch.testing.assert_close(got.sq_err, want.sq_err, rtol=1e-5, atol=0)
        torch.testing.assert_close(got.sq_norm, want.sq_norm, rtol=1e-5, atol=0)


def group_layout(kind, n_experts, g):
    if kind == "one_huge":
        sizes = torch.zeros(n_experts, dtype=torch.int64)
        sizes[int(torch.randint(0, n_experts, (1,), generator=g))] = 150
        return sizes
    return torch.randint(0, 60, (n_experts,), generator=g) * (torch.rand(n_experts, generator=g) > 0.3)


def float64_oracle_leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from(["rowwise", "blockwise"]),
    st.booleans(),
    st.sampled_from(["random", "one_huge"]),
    st.integers(1, 4),
    st.sampled_from([(48, 32), (160, 80)]),
    st.integers(0, 9),
    st.integers(0, 2**31 - 1),
)
def test_grouped_mm_fp8_kernels_match_float64_of_the_quantised_math(
    scaling, wgrad_fp8, layout, n_experts, kn, tail, seed
):
    g = torch.Generator().manual_seed(seed)
    k, n = kn
    sizes = group_layout(layout, n_experts, g)
    offsets = torch.cumsum(sizes, 0).to(torch.int32)
    m = int(sizes.sum()) + tail
    x = torch.randn(m, k, generator=g).requires_grad_()
    w = (torch.randn(n_experts, k, n, generator=g) / k**0.5).requires_grad_()
    fast = scaling == "rowwise" and seed % 2 == 1  # the interpreter upcasts: fast accumulation is plumbing only here
    y = nk.grouped_mm_fp8(x, w, offsets, scaling, wgrad_fp8=wgrad_fp8, fast_accum=fast)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    xr, wr = float64_oracle_leaves(x, w)
    want = R.grouped_mm_fp8(xr, wr, offsets, scaling, compute=torch.float64, wgrad_fp8=wgrad_fp8)
    want.backward(dy)
    assert y.shape == (m, n) and y[m - tail :].eq(0).all() and x.grad[m - tail :].eq(0).all()
    if int(sizes.sum()):
        assert rel_err(y, want) < 1e-5 and rel_err(x.grad, xr.grad) < 1e-5
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-5)  # empty groups: exactly 0
    assert w.grad[sizes == 0].eq(0).all()


@pytest.fixture(params=["pointer", "tma"])
def gemm_variant(request, monkeypatch):
    """Run a test with each grouped-GEMM variant; for "tma", check that the fp8 GEMMs really took descriptors."""
    from nmoe.kernels import _lowprec_ops, _triton_ops

    used = []
    real = _lowprec_ops._use_tma
    monkeypatch.setattr(_lowprec_ops, "_use_tma", lambda qa, b: used.append(real(qa, b)) or used[-1])
    with _triton_ops.use_gemm_variant(request.param):
        yield request.param
    assert used and all(used) == (request.param == "tma")


@pytest.mark.parametrize("wgrad_fp8", [True, False])
@pytest.mark.parametrize("scaling", R.SCALINGS)
def test_expert_mlp_fp8_kernels_match_float64_of_the_quantised_math(scaling, wgrad_fp8, gemm_variant):
    g = torch.Generator().manual_seed(1)
    offsets = torch.tensor([5, 5, 75, 78], dtype=torch.int32)
    m, d, h = 83, 144, 80
    rows = torch.randn(m, d, generator=g).requires_grad_()
    w_up = (torch.randn(4, d, 2 * h, generator=g) / d**0.5).requires_grad_()
    w_down = (torch.randn(4, h, d, generator=g) / h**0.5).requires_grad_()
    y = nk.expert_mlp_fp8(rows, offsets, w_up, w_down, scaling, wgrad_fp8=wgrad_fp8)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    leaves = float64_oracle_leaves(rows, w_up, w_down)
    want = R.expert_mlp_fp8(leaves[0], offsets, leaves[1], leaves[2], scaling, torch.float64, wgrad_fp8=wgrad_fp8)
    want.backward(dy)
    assert y[78:].eq(0).all() and rows.grad[78:].eq(0).all() and w_up.grad[1].eq(0).all()
    assert rel_err(y, want) < 1e-4
    for name, t, ref in zip(("rows", "w_up", "w_down"), (rows, w_up, w_down), leaves):
        assert rel_err(t.grad, ref.grad) < 1e-4, name
    exact = float64_oracle_leaves(rows, w_up, w_down)
    y_exact = grouped_mm(swiglu(grouped_mm(exact[0], exact[1], offsets)), exact[2], offsets)
    assert rel_err(y, y_exact) < 0.1  # two e4m3 GEMMs in a row


def test_bf16_inputs_give_bf16_outputs_within_bf16_rounding():
    g = torch.Generator().manual_seed(2)
    offsets = torch.tensor([20, 50], dtype=torch.int32)
    x = torch.randn(50, 64, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(2, 64, 32, generator=g) / 8).bfloat16().requires_grad_()
    y = nk.grouped_mm_fp8(x, w, offsets, "blockwise")
    y.backward(torch.ones_like(y))
    xr, wr = float64_oracle_leaves(x, w)
    want = R.grouped_mm_fp8(xr, wr, offsets, "blockwise", compute=torch.float64)
    want.backward(torch.ones(want.shape, dtype=want.dtype))
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert rel_err(y, want) < 4e-3 and rel_err(x.grad, xr.grad) < 4e-3 and rel_err(w.grad, wr.grad) < 4e-3


def test_moe_experts_fp8_quantises_float32_master_weights_under_bf16_activations():
    """The model's fp8 call: bf16 tokens, the float32 master weights quantised straight (no bf16 copy), float32
    weight gradients from the dW GEMM's accumulator; within bf16 rounding of the float64 reference."""
    g = torch.Generator().manual_seed(5)
    n_tokens, top_k, n_experts, d, h = 24, 2, 3, 64, 48
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tokens)])
    x = torch.randn(n_tokens, d, generator=g).bfloat16().requires_grad_()
    weights = torch.rand(n_tokens, top_k, generator=g).requires_grad_()
    w_up = (torch.randn(n_experts, d, 2 * h, generator=g) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, generator=g) / h**0.5).requires_grad_()
    y = nk.moe_experts_fp8(x, ids, weights, w_up, w_down, wgrad_fp8=False, fast_accum=True)
    dy = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(dy)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and w_up.grad.dtype == w_down.grad.dtype == torch.float32
    leaves = float64_oracle_leaves(x, weights, w_up, w_down)
    want = R.moe_experts_fp8(leaves[0], ids, *leaves[1:], "rowwise", torch.float64, wgrad_fp8=False)
    want.backward(dy.double())
    assert rel_err(y, want) < 1e-2
    for name, t, ref in zip(("x", "weights", "w_up", "w_down"), (x, weights, w_up, w_down), leaves):
        assert rel_err(t.grad, ref.grad) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_rows_is_the_swiglu_backward_then_the_row_quantiser(dtype):
    """The kernel after the experts' plain dgrad GEMM (bf16 and rowwise fp8): d_pre = SwiGLU backward of the weighted
    d_act (stored in pre's dtype), with quantize its e4m3 rows exactly what the row quantiser makes of the stored
    d_pre, and the routing-weight gradient <d_act, act>; rows of dropped slots (past offsets[-1]) zero, no
    gradient, whatever d_act holds there."""
    from nmoe.kernels._lowprec_ops import quantize_rows
    from nmoe.kernels._triton_ops import swiglu_backward_rows

    g = torch.Generator().manual_seed(6)
    m, h, kept = 40, 80, 33  # 80 = 64 + 16: two register parts
    offsets = torch.tensor([10, 10, kept], dtype=torch.int32)
    d_act = torch.randn(m, h, generator=g)
    d_act[kept:] = float("nan")  # never written by the dgrad GEMM
    pre = torch.randn(m, 2 * h, generator=g).to(dtype)
    weights, w_idx = torch.rand(m, generator=g), torch.randperm(m, generator=g)
    d_weights = torch.zeros(m)
    d_pre, q, s = swiglu_backward_rows(d_act, pre, offsets, weights, w_idx, d_weights, quantize=True)
    plain_dw = torch.zeros(m)
    plain = swiglu_backward_rows(d_act, pre, offsets, weights, w_idx, plain_dw)
    assert torch.equal(plain, d_pre) and torch.equal(plain_dw, d_weights)
    assert d_pre[kept:].eq(0).all() and q[kept:].float().eq(0).all()
    slot = weights[w_idx[:kept]]
    want = R.swiglu_backward(pre[:kept].double(), d_act[:kept].double() * slot.double()[:, None])
    assert d_pre.dtype == dtype and rel_err(d_pre[:kept], want) < (4e-3 if dtype == torch.bfloat16 else 1e-6)
    q_want, s_want = quantize_rows(d_pre[:kept], blockwise=False)
    assert torch.equal(q[:kept].view(torch.uint8), q_want.view(torch.uint8)) and torch.equal(s[:kept], s_want)
    act = R.swiglu_f32(pre[:kept].float()).to(dtype).double()
    dw_want = torch.zeros(m, dtype=torch.float64)
    dw_want[w_idx[:kept]] = (d_act[:kept].double() * act).sum(1)
    assert rel_err(d_weights, dw_want) < 1e-6
    assert d_weights[w_idx[kept:]].eq(0).all()  # dropped slots: no gradient written
    fold = torch.rand(3, 2 * h, generator=g) + 0.01  # w_up's forward column scales, per expert
    d_pre_f, q_f, s_f = swiglu_backward_rows(d_act, pre, offsets, weights, w_idx, torch.zeros(m), True, fold)
    assert torch.equal(d_pre_f, d_pre)  # d_pre itself (the dW operand) is not scaled
    expert = torch.cat([torch.zeros(10, dtype=torch.long), torch.full((kept - 10,), 2)])  # groups 0 and 2
    q_want, s_want = quantize_rows(d_pre[:kept].float() * fold[expert], blockwise=False)
    assert torch.equal(q_f[:kept].view(torch.uint8), q_want.view(torch.uint8)) and torch.equal(s_f[:kept], s_want)


@pytest.mark.parametrize("shape", [(2, 40, 24), (3, 128, 200), (1, 12, 100), (2, 1408, 64)])
def test_fp8_code_transpose_is_exact(shape):
    """The e4m3 codes' transposed copy (moved as int32 words of four codes): every bit, masked tile edges too."""
    from nmoe.kernels._lowprec_ops import transpose_codes

    q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    q = q.view(torch.float8_e4m3fn)
    assert_bitwise(transpose_codes(q), q.transpose(1, 2).contiguous(), "transposed codes")


def test_fp8_gpu_path_refuses_misaligned_dims():
    with pytest.raises(nk.UnsupportedInput, match="multiple of 16"):
        nk.grouped_mm_fp8(torch.randn(4, 24), torch.randn(1, 24, 16), torch.tensor([4], dtype=torch.int32))
    with pytest.raises(nk.UnsupportedInput, match="H=20 must be a multiple of 16"):
        nk.expert_mlp_fp8(
            torch.randn(4, 16), torch.tensor([4], dtype=torch.int32), torch.randn(1, 16, 40), torch.randn(1, 20, 16)
        )


@pytest.mark.parametrize("wgrad_fp8", [True, False])
@pytest.mark.parametrize("scaling", R.SCALINGS)
def test_moe_experts_fp8_kernels_match_float64_of_the_quantised_math(scaling, wgrad_fp8, gemm_variant):
    """The fused op (token-order quantisation, gathering GEMMs, weighted combine and SwiGLU-backward epilogue) against
    its float64 reference, with an empty expert and dropped slots; under the "tma" variant the gathering GEMMs take
    pointers and the others descriptors."""
    g = torch.Generator().manual_seed(3)
    n_tokens, top_k, n_experts, d, h = 29, 3, 4, 144, 80
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tokens)])
    ids[ids == 1] = 2  # expert 1 gets no rows
    ids[0, 1] = ids[5, 2] = ids[7, 0] = -1  # dropped slots
    x = torch.randn(n_tokens, d, generator=g).requires_grad_()
    weights = torch.rand(n_tokens, top_k, generator=g).requires_grad_()
    w_up = (torch.randn(n_experts, d, 2 * h, generator=g) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, generator=g) / h**0.5).requires_grad_()
    y = nk.moe_experts_fp8(x, ids, weights, w_up, w_down, scaling, wgrad_fp8=wgrad_fp8)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    leaves = float64_oracle_leaves(x, weights, w_up, w_down)
    want = R.moe_experts_fp8(leaves[0], ids, *leaves[1:], scaling, torch.float64, wgrad_fp8=wgrad_fp8)
    want.backward(dy.double())
    assert rel_err(y, want) < 1e-4
    for name, t, ref in zip(("x", "weights", "w_up", "w_down"), (x, weights, w_up, w_down), leaves):
        assert rel_err(t.grad, ref.grad) < 1e-4, name
    assert weights.grad[0, 1] == weights.grad[5, 2] == weights.grad[7, 0] == 0
    assert w_up.grad[1].eq(0).all() and w_down.grad[1].eq(0).all()
    exact = float64_oracle_leaves(x, weights, w_up, w_down)
    y_exact = moe_experts_ref(exact[0], ids, *exact[1:])
    assert rel_err(y, y_exact) < 0.1  # two e4m3 GEMMs in a row


def test_plain_fp8_gemm_runs_ours_off_hopper_and_a_forced_cutlass_kernel_says_why_it_cannot():
    """gemm_rows (the routed layer's down and dgrad-up GEMMs) is `gemm` wherever torch's CUTLASS kernel cannot run;
    forcing that kernel there is refused with the reason and the remedy, and each operand it does not take is named."""
    from nmoe.kernels import _lowprec_ops as ops

    g = torch.Generator().manual_seed(5)
    offsets = torch.tensor([40, 40, 96], dtype=torch.int32)  # an empty expert, and 8 tail rows
    qa, sa = ops.quantize_rows(torch.randn(104, 64, generator=g), False)
    w = torch.randn(3, 64, 48, generator=g)
    b = ops.quantize_weight(w, False, "fwd")
    want = torch.empty(104, 48, dtype=torch.bfloat16)
    ops.gemm(qa, sa, False, b, offsets, want, 48, 64, fast=True)
    assert_bitwise(ops.gemm_rows(qa, sa, b, offsets, 48, 64, torch.bfloat16, True)[:96], want[:96])
    with (
        ops.use_fp8_gemm_kernel("cutlass"),
        pytest.raises(ValueError, match="needs a CUDA GPU; use 'auto' or 'triton'"),
    ):
        ops.gemm_rows(qa, sa, b, offsets, 48, 64, torch.bfloat16, True)
    with pytest.raises(ValueError, match="unknown fp8 GEMM kernel 'cublas'"):
        with ops.use_fp8_gemm_kernel("cublas"):
            pass
    assert ops.cutlass_layout_problem(qa, sa, b, 48, 64, torch.bfloat16, True) == ""
    assert "fast accumulation" in ops.cutlass_layout_problem(qa, sa, b, 48, 64, torch.bfloat16, False)
    assert "fast accumulation" in ops.cutlass_layout_problem(qa, sa, b, 48, 64, torch.float32, True)
    k_by_n = ops.WeightOperand(b.q.transpose(1, 2).contiguous(), b.scales, (64 * 48, 48, 1), b.scale_strides)
    assert "[E, N, K]" in ops.cutlass_layout_problem(qa, sa, k_by_n, 48, 64, torch.bfloat16, True)
    q24, s24 = ops.quantize_rows(torch.randn(104, 24, generator=g), False)
    b24 = ops.quantize_weight(torch.randn(3, 24, 48, generator=g), False, "fwd")
    assert "multiples of 16" in ops.cutlass_layout_problem(q24, s24, b24, 48, 24, torch.bfloat16, True)
    blocked = ops.quantize_weight(w, True, "fwd")
    assert "one scale per row" in ops.cutlass_layout_problem(qa, sa[:, None], blocked, 48, 64, torch.bfloat16, True)


def _call_site_operands(call_site: str):
    """(qa, sa, b, offsets, n, k) as the routed layer hands them to gemm_rows (CPU; a tail row, an empty expert)."""
    from nmoe.kernels import _lowprec_ops as ops

    g = torch.Generator().manual_seed(6)
    e, d, h = 3, 64, 48
    offsets = torch.tensor([40, 40, 96], dtype=torch.int32)
    pre = torch.randn(104, 2 * h, generator=g).bfloat16()
    w_up, w_down = torch.randn(e, d, 2 * h, generator=g), torch.randn(e, h, d, generator=g)
    if call_site in ("up", "dgrad down"):  # gathered: qa, sa are the token rows, a_idx picks them
        x = torch.randn(35, d, generator=g).bfloat16()
        qa, sa = ops.quantize_rows(x, False)
        if call_site == "up":
            _, qt_up, s_up = ops.quantize_weight_both(w_up, False, ops.UP_FOLD)
            return qa, sa, ops.weight_operand(None, qt_up, s_up, False, "fwd", ops.UP_FOLD), offsets, 2 * h, d
        q_dn, _, s_dn = ops.quantize_weight_both(w_down, False, ops.DOWN_FOLD)
        return qa, sa, ops.weight_operand(q_dn, None, s_dn, False, "dgrad", ops.DOWN_FOLD), offsets, h, d
    if call_site == "down":
        _, qt_dn, s_dn = ops.quantize_weight_both(w_down, False, ops.DOWN_FOLD)
        qa, sa = ops.quantize_rows(pre, False, swiglu_input=True, fold=(s_dn, offsets))
        return qa, sa, ops.weight_operand(None, qt_dn, s_dn, False, "fwd", ops.DOWN_FOLD), offsets, d, h
    q_up, _, s_up = ops.quantize_weight_both(w_up, False, ops.UP_FOLD)
    _, qa, sa = ops._triton_ops.swiglu_backward_rows(
        torch.randn(104, h, generator=g).bfloat16(), pre, offsets, quantize=True, fold=s_up, store=False
    )
    return qa, sa, ops.weight_operand(q_up, None, s_up, False, "dgrad", ops.UP_FOLD), offsets, d, 2 * h


def _on_meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


@pytest.mark.parametrize("call_site", ["down", "dgrad up"])
def test_the_cutlass_call_passes_torchs_argument_checks(call_site, monkeypatch):
    """torch._scaled_grouped_mm's meta implementation runs its shape, stride and dtype checks on the CPU: the
    routed layer's two CUTLASS GEMMs, on the operands its call sites build, pass them with fast accumulation."""
    from nmoe.kernels import _lowprec_ops as ops

    real = getattr(torch, "_scaled_grouped_mm", None)
    if real is None:
        pytest.skip("this torch has no torch._scaled_grouped_mm")
    qa, sa, b, offsets, n, k = _call_site_operands(call_site)
    assert ops.cutlass_layout_problem(qa, sa, b, n, k, torch.bfloat16, True) == ""
    calls = []
    monkeypatch.setattr(torch, "_scaled_grouped_mm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    meta_b = ops.WeightOperand(_on_meta(b.q), _on_meta(b.scales), b.strides, b.scale_strides)
    out = ops._cutlass_gemm(_on_meta(qa), _on_meta(sa), meta_b, _on_meta(offsets), n)
    assert out.shape == (qa.shape[0], n) and out.dtype == torch.bfloat16
    assert calls == [dict(offs=calls[0]["offs"], out_dtype=torch.bfloat16, use_fast_accum=True)]
    too_many = ops.WeightOperand(torch.empty(1024, n, k, dtype=b.q.dtype, device="meta"), b.scales, b.strides,
                                 b.scale_strides)  # fmt: skip
    assert "1 to 1023 experts" in ops.cutlass_layout_problem(qa, sa, too_many, n, k, torch.bfloat16, True)


def test_the_routed_layer_reads_no_row_the_cutlass_path_leaves_unwritten(monkeypatch):
    """Forced onto the CUTLASS-built kernels (here: our GEMM leaving NaN in the rows past offsets[-1], as torch's and
    quack's kernels leave them unwritten), the routed fp8 layer gives the same bits as with our GEMM alone: the
    dropped-slot rows of all four GEMMs' outputs are never read. No rows: no GEMM at all."""
    from nmoe.kernels import _lowprec_ops as ops

    calls = []

    def nan_tail_gemm(qa, sa, b, offsets, n):
        out = torch.full((qa.shape[0], n), float("nan"), dtype=torch.bfloat16)
        rows = int(offsets[-1])
        ops.gemm(qa[:rows], sa[:rows], False, b, offsets, out[:rows], n, qa.shape[1], fast=True)
        calls.append(n)
        return out

    def nan_tail_gathered(qa, sa, b, offsets, n, k, a_idx, out):
        out.fill_(float("nan"))
        rows = int(offsets[-1])
        ops.gemm(qa, sa, False, b, offsets, out[:rows], n, k, fast=True, a_idx=a_idx[:rows])
        calls.append(("gathered", n))
        return out

    monkeypatch.setattr(ops, "cutlass_unavailable", lambda *args: "")
    monkeypatch.setattr(ops, "_cutlass_gemm", nan_tail_gemm)
    monkeypatch.setattr(ops, "_quack_gemm_into", nan_tail_gathered)
    g = torch.Generator().manual_seed(7)
    n_tokens, top_k, n_experts, d, h = 21, 3, 4, 64, 48
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tokens)])
    ids[ids == 1] = 2
    ids[0, 1] = ids[4, 2] = ids[9, 0] = -1  # dropped slots: rows past offsets[-1]
    inputs = (torch.randn(n_tokens, d, generator=g).bfloat16(), torch.rand(n_tokens, top_k, generator=g),
              torch.randn(n_experts, d, 2 * h, generator=g) / d**0.5, torch.randn(n_experts, h, d, generator=g) / h**0.5)  # fmt: skip
    dy = torch.randn(n_tokens, d, generator=g).bfloat16()
    results = {}
    for kernel in ("cutlass", "triton"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with ops.use_fp8_gemm_kernel(kernel):
            y = nk.moe_experts_fp8(leaves[0], ids, leaves[1], *leaves[2:], wgrad_fp8=True, fast_accum=True)
            results[kernel] = (y, *torch.autograd.grad(y, leaves, dy))
    assert calls == [("gathered", 2 * h), d, ("gathered", h), d]  # up, down, dgrad down, dgrad up
    for name, got, want in zip(("y", "dx", "d_weights", "dw_up", "dw_down"), *results.values()):
        assert torch.isfinite(got).all(), name
        assert_bitwise(got, want, name)
    with ops.use_fp8_gemm_kernel("cutlass"):
        qa, sa, b, offsets, n, k = _call_site_operands("down")
        assert ops.gemm_rows(qa[:0], sa[:0], b, offsets, n, k, torch.bfloat16, True).shape == (0, n)
        token = torch.zeros(0, dtype=torch.int32)
        assert ops.gemm_rows(qa, sa, b, offsets, n, k, torch.bfloat16, True, a_idx=token).shape == (0, n)
    assert len(calls) == 4


@pytest.mark.parametrize("call_site", ["up", "dgrad down"])
def test_the_gathering_gemms_hand_quack_the_layout_it_takes(call_site):
    """The routed layer's up and dgrad-down operands are what quack's kernel takes (weights [E, N, K], K contiguous,
    16-byte rows, a scale per row and per (expert, column))."""
    from nmoe.kernels import _lowprec_ops as ops

    qa, sa, b, offsets, n, k = _call_site_operands(call_site)
    assert ops.cutlass_layout_problem(qa, sa, b, n, k, torch.bfloat16, True, True) == ""
    assert "fast accumulation" in ops.cutlass_layout_problem(qa, sa, b, n, k, torch.bfloat16, False, True)
    assert "one scale per row" in ops.cutlass_layout_problem(qa, sa[:-1], b, n, k, torch.bfloat16, True, True)


def test_the_quack_call_gets_the_gathered_rows_scales_and_weight_view(monkeypatch):
    """What `_quack_gemm_into` hands quack's kernel, evaluated as that kernel's contract says (out[r] =
    (qa[token[r]] @ b_kn[e]) * sa[token[r]] * col_scales[e] for the rows of each expert e), is our GEMM's result."""
    from nmoe.kernels import _lowprec_ops as ops
    from nmoe.kernels import _quack_gemm

    def contract(qa, sa, token, b_kn, col_scales, offsets, out):
        start = 0
        for e, end in enumerate(offsets.tolist()):
            rows = token[start:end].long()
            out[start:end] = ((qa[rows].float() @ b_kn[e].float()) * sa[rows, None] * col_scales[e]).bfloat16()
            start = end

    monkeypatch.setattr(_quack_gemm, "gathered_gemm", contract)
    for call_site in ("up", "dgrad down"):
        qa, sa, b, offsets, n, k = _call_site_operands(call_site)
        token = torch.randint(0, qa.shape[0], (104,), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
        got = torch.zeros(104, n, dtype=torch.bfloat16)
        ops._quack_gemm_into(qa, sa, b, offsets, n, k, token, got)
        want = torch.zeros(104, n, dtype=torch.bfloat16)
        ops.gemm(qa, sa, False, b, offsets, want, n, k, fast=True, a_idx=token)
        used = int(offsets[-1])
        assert rel_err(got[:used].float(), want[:used].float()) < 1e-2, call_site  # bf16 rounding apart


def test_quack_is_optional_and_its_fast_accumulation_reaches_only_its_own_kernels(monkeypatch):
    """Without quack the gathering GEMMs stay ours ("auto") or are refused with the install line ("cutlass"); the
    __init__ wrapper turns fast accumulation on for the kernel classes minted from nmoe's epilogue only."""
    from nmoe.kernels import _lowprec_ops as ops
    from nmoe.kernels import _quack_gemm
    from nmoe.kernels._quack_fast_accum import fast_accumulation_init

    monkeypatch.setattr(_quack_gemm, "missing", lambda: "quack is not installed; " + _quack_gemm.INSTALL)
    qa, sa, b, offsets, n, k = _call_site_operands("up")
    token = torch.randint(0, qa.shape[0], (104,), dtype=torch.int32)
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "pip install 'quack-kernels" in ops.cutlass_unavailable(qa, sa, b, n, k, torch.bfloat16, True, True)
    with ops.use_fp8_gemm_kernel("cutlass"), pytest.raises(ValueError, match="cutlass cannot run.*quack is not inst"):
        ops.gemm_rows(qa, sa, b, offsets, n, k, torch.bfloat16, True, a_idx=token)
    ours = []
    monkeypatch.setattr(ops, "gemm", lambda *args, **kwargs: ours.append(kwargs["a_idx"]))
    monkeypatch.setattr(ops, "_pick_cutlass", lambda *args: pytest.fail("nothing to pick without quack"))
    with ops.use_fp8_gemm_kernel("auto"):
        ops.gemm_rows(qa, sa, b, offsets, n, k, torch.bfloat16, True, a_idx=token)
    assert len(ours) == 1 and ours[0] is token  # "auto" ran ours

    class Kernel:
        def __init__(self, acc_dtype, a_dtype, tile, cluster, pingpong=False, is_persistent=True,
                     fp8_fast_accum=False, gather_A=False):  # fmt: skip
            self.fast, self.gather = fp8_fast_accum, gather_A

    def ours(acc, row_scale, col_scale):
        return {"D": acc}

    Kernel.__init__ = fast_accumulation_init(Kernel.__init__, ours)
    minted = type("GemmMod_x", (Kernel,), {"_epi_mod_fn": staticmethod(ours)})
    other = type("GemmMod_y", (Kernel,), {"_epi_mod_fn": staticmethod(lambda acc: {"D": acc})})
    assert minted(1, 2, 3, 4, gather_A=True).fast and minted(1, 2, 3, 4, True, True, False, True).gather
    assert minted(1, 2, 3, 4, True, True, False, True).fast
    assert not other(1, 2, 3, 4).fast and not Kernel(1, 2, 3, 4).fast


def test_kernel_choices_are_checked_from_the_environment_and_switch_back_after_a_block(monkeypatch):
    from nmoe.kernels import _lowprec_ops as ops
    from nmoe.kernels import _triton_ops

    monkeypatch.setenv("NMOE_KERNELS_FP8_GEMM", "cublas")
    with pytest.raises(ValueError, match=r"NMOE_KERNELS_FP8_GEMM='cublas': expected one of \('auto', 'triton'"):
        _triton_ops.env_choice("NMOE_KERNELS_FP8_GEMM", ops.FP8_GEMM_KERNELS, "auto")
    monkeypatch.delenv("NMOE_KERNELS_FP8_GEMM")
    assert _triton_ops.env_choice("NMOE_KERNELS_FP8_GEMM", ops.FP8_GEMM_KERNELS, "auto") == "auto"
    before = (ops._fp8_gemm_kernel, _triton_ops._gemm_variant)
    with pytest.raises(RuntimeError, match="inside"):
        with ops.use_fp8_gemm_kernel("triton"), _triton_ops.use_gemm_variant("tma"):
            assert (ops._fp8_gemm_kernel, _triton_ops._gemm_variant) == ("triton", "tma")
            raise RuntimeError("inside")
    assert (ops._fp8_gemm_kernel, _triton_ops._gemm_variant) == before
    with pytest.raises(ValueError, match="unknown grouped GEMM variant 'wgmma'"):
        with _triton_ops.use_gemm_variant("wgmma"):
            pass
