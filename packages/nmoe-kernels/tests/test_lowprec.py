"""Low-precision reference (the CPU path): code tables, quantiser bounds, NVFP4 AdamW semantics, refusals.
The Triton kernels are checked against this reference in test_lowprec_interpret.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nmoe.kernels as nk
from nmoe.kernels import lowprec
from nmoe.kernels import reference_lowprec as R
from nmoe.kernels.reference import grouped_mm

E4M3_SUBNORMAL = 2.0**-9


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------
# Code tables and rounding
# ---------------------------------------------------------------------------------------------------------


def test_e2m1_code_table_and_round_to_nearest_even():
    values = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert R.e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist() == values + [-v for v in values]
    codes = torch.tensor([c for c in range(16) if c != 8], dtype=torch.uint8)
    assert torch.equal(R.e2m1_encode(R.e2m1_decode(codes)), codes)  # every value is its own code
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # ties go to the even code (mantissa 0)
    assert R.e2m1_decode(R.e2m1_encode(ties)).tolist() == [0, 1, 1, 2, 2, 4, 4]
    near = torch.tensor([0.26, 0.74, 1.26, 1.76, 2.51, 3.49, 5.01, 6.9, 1e9])
    assert R.e2m1_decode(R.e2m1_encode(near)).tolist() == [0.5, 0.5, 1.5, 2, 3, 3, 6, 6, 6]
    assert R.e2m1_encode(torch.tensor([-0.1, -0.0, -0.3])).tolist() == [0, 0, 9]  # never -0


def test_e4m3_code_table_and_round_to_nearest_even():
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = table[torch.isfinite(table)]
    assert finite.numel() == 254 and finite.max() == 448 and finite[finite > 0].min() == E4M3_SUBNORMAL
    pos = finite[finite >= 0].unique()  # sorted; the index of a positive value is its code
    assert torch.equal(pos, table[:127])
    mids = (pos[:-1] + pos[1:]) / 2
    even = torch.where(torch.arange(126) % 2 == 0, pos[:-1], pos[1:])
    assert torch.equal(R.round_e4m3(mids).float(), even)
    assert torch.equal(R.round_e4m3(-mids).float(), -even)
    assert R.round_e4m3(torch.tensor([460.0, 1e30, -1e30])).float().tolist() == [448, 448, -448]


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_pack_e2m1_is_low_nibble_first_and_round_trips(codes):
    t = torch.tensor(codes, dtype=torch.uint8).reshape(1, -1)
    packed = R.pack_e2m1(t)
    assert packed[0, 0] == codes[0] | (codes[1] << 4)
    assert torch.equal(R.unpack_e2m1(packed), t)


# ---------------------------------------------------------------------------------------------------------
# Quantiser round-trip bounds (reference)
# ---------------------------------------------------------------------------------------------------------

magnitudes = st.sampled_from([1e-3, 0.02, 1.0, 300.0])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.sampled_from([16, 32, 64]), magnitudes, st.booleans(), st.integers(0, 2**31 - 1))
def test_nvfp4_round_trip_error_is_at_most_half_a_code_step(rows, k, magnitude, zero_block, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * magnitude * torch.rand(rows, 1, generator=g).add(0.1)
    if zero_block:
        w[0, :16] = 0
    q = R.quantize_nvfp4(w)
    assert q.codes.shape == (rows, k // 2) and q.scales.shape == (rows, k // 16) and q.tensor_scale.dim() == 0
    assert q.shape == w.shape and q.scales.float().max() <= 448
    back = R.dequantize_nvfp4(q, torch.float32)
    unit = (q.scales.float() * q.tensor_scale).repeat_interleave(16, dim=1)  # one normalised FP4 unit
    y = (w / unit).abs()
    half_step = torch.where(y <= 2, 0.25, torch.where(y <= 4, 0.5, 1.0))
    assert ((w - back).abs() <= half_step * unit * (1 + 1e-6) + 1e-30).all()
    if zero_block:
        assert back[0, :16].eq(0).all()
    # the per-element bound above is the property; this only catches gross failures (a single random 16-block
    # reaches 0.157 relative error in 200k draws, so a tighter bound fails by chance)
    assert rel_err(back, w) < 0.2


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 300),
    magnitudes,
    st.sampled_from(["rowwise", "blockwise"]),
    st.integers(0, 2**31 - 1),
)
def test_fp8_activation_round_trip_within_half_an_e4m3_ulp(m, c, magnitude, scaling, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, c, generator=g) * magnitude
    x[0] = 0  # an all-zero row gets the smallest normal scale and zero codes
    q, s = R.quantize_activation(x, scaling)
    assert q.dtype == torch.float8_e4m3fn and s.shape == ((m,) if scaling == "rowwise" else (m, -(-c // 128)))
    back = R.dequantize_activation(q, s, scaling, torch.float32)
    scale = R.dequantize_activation(torch.ones_like(x).to(torch.float8_e4m3fn), s, scaling, torch.float32)
    bound = x.abs() * 2.0**-4 + scale * E4M3_SUBNORMAL / 2
    assert ((x - back).abs() <= bound * (1 + 1e-6)).all()
    assert back[0].eq(0).all() and s[0].eq(R.ZERO_SLICE_SCALE).all()
    assert ((q.float().abs().amax(dim=1) == 448) | (x.abs().amax(dim=1) == 0)).all()  # the row amax maps to 448


def test_fp8_weight_quantisers_scale_the_right_axes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 200, 144, generator=g)
    for dim, other in ((1, 2), (2, 1)):
        q, s = R.quantize_fp8_rowwise(w, dim)
        assert s.shape == (3, w.shape[other]) and torch.equal(s, w.abs().amax(dim=dim) / 448)
    q, s = R.quantize_fp8_blockwise(w, (128, 128))
    assert s.shape == (3, 2, 2) and s[1, 1, 0] == w[1, 128:, :128].abs().max() / 448
    assert rel_err(R.dequantize_weight(q, s, "blockwise", "fwd", torch.float32), w) < 0.04


@pytest.mark.parametrize("fold_pass", ["fwd", "dgrad"])
def test_a_dead_weight_slice_does_not_spoil_the_folded_operand(fold_pass):
    """A weight slice of zeros (a dead row of w_down, a dead column of w_up) has zero codes; its scale, folded into
    the other operand's rows, must not become their amax and push the live columns into e4m3's subnormals."""
    g = torch.Generator().manual_seed(0)
    n_experts, m, k, n = 2, 256, 128, 96
    offsets = torch.tensor([128, 256], dtype=torch.int32)
    w = torch.randn(n_experts, k, n, generator=g, dtype=torch.float64) * 2e-4
    if fold_pass == "fwd":  # w_down: scales per row k (over n) fold into x[:, k]
        w[:, 5, :] = 0
        x = torch.randn(m, k, generator=g, dtype=torch.float64)
        exact = R._grouped(x, w, offsets)
    else:  # w_up: scales per column n (over k) fold into x[:, n] of the dgrad
        w[:, :, 5] = 0
        x = torch.randn(m, n, generator=g, dtype=torch.float64)
        exact = R._grouped(x, w.transpose(1, 2), offsets)
    unfolded = R.fp8_gemm(x, w, offsets, "rowwise", torch.float64, fold_pass)
    folded = R.expert_gemm(x, w, offsets, "rowwise", torch.float64, fold_pass, fold_pass)
    assert rel_err(folded, exact) < 1.2 * rel_err(unfolded, exact) + 1e-3


@pytest.mark.parametrize("dead", ["none", "slices", "zero_init"])
def test_rowwise_fp8_wgrads_on_the_gemms_codes_are_as_close_as_fresh_quantisation(dead):
    """The rowwise recipe's dW reads act's and d_pre's folded codes: as close to the exact dW as quantising both
    operands afresh per column, with dead weight slices and a zero-initialised w_down too (whose gradients
    are not zero: a dead slice's scale folded into act must not wipe act's column)."""
    g = torch.Generator().manual_seed(1)
    n_experts, m, d, h = 2, 300, 64, 48
    offsets = torch.tensor([170, 290], dtype=torch.int32)  # 10 dropped rows
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    act = torch.randn(m, h, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, m, dtype=torch.float64)[:, None]
    dy, d_pre = torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(m, 2 * h, generator=g)
    w_up = torch.randn(n_experts, d, 2 * h, generator=g, dtype=torch.float64) * 0.02
    w_down = torch.randn(n_experts, h, d, generator=g, dtype=torch.float64) * 0.02
    if dead == "slices":
        w_down[0, 5], w_up[1, :, 7] = 0, 0
    if dead == "zero_init":
        w_down.zero_()
    got = R.rowwise_fp8_wgrads(x, act, dy, d_pre, w_up, w_down, offsets, torch.float64)
    pairs = ((x, d_pre.double()), (act, dy))
    for name, dw, (a, b) in zip(("dw_up", "dw_down"), got, pairs):
        exact = R._grouped_wgrad(a, b, offsets)
        fresh = R.fp8_wgrad(a, b, offsets, torch.float64, "rowwise")
        assert rel_err(dw, exact) < 1.5 * rel_err(fresh, exact), name
    # as close as a live row (about 0.04 with x and dy requantised from their row codes); wiped, it would be 1
    assert rel_err(got[1][0, 5], R._grouped_wgrad(act, dy, offsets)[0, 5]) < 0.1, "a dead w_down row's gradient"
    assert rel_err(got[0][1, :, 7], R._grouped_wgrad(x, d_pre.double(), offsets)[1, :, 7]) < 0.1


def test_grouped_col_quantiser_chunks_never_cross_groups():
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([3, 3, 300, 301], dtype=torch.int32)
    x = torch.randn(310, 40, generator=g)
    chunks = R.group_chunks(offsets)
    assert [(a, b) for _, a, b in chunks] == [(0, 3), (3, 131), (131, 259), (259, 300), (300, 301)]
    q, s = R.quantize_fp8_grouped_cols(x, offsets)
    assert s.shape == (R.grouped_col_chunks(310, 4), 40)
    for cid, first, end in chunks:
        assert torch.equal(s[cid], x[first:end].abs().amax(0) / 448)
    assert q[301:].float().eq(0).all() and s[len(chunks) :].eq(1).all()
    back = R.dequantize_fp8_grouped_cols(q, s, offsets, torch.float32)
    assert rel_err(back[:301], x[:301]) < 0.04


# ---------------------------------------------------------------------------------------------------------
# NVFP4 AdamW semantics (reference)
# ---------------------------------------------------------------------------------------------------------


def adamw_state(shape, seed, magnitude=0.02, rule="nearest"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * magnitude
    q = R.quantize_nvfp4(w)
    residual = torch.zeros(shape, dtype=torch.bfloat16) if rule == "residual" else None
    return q, torch.zeros(shape), torch.zeros(shape), residual, g


def clone_q(q):
    return R.NVFP4Tensor(*(t.clone() for t in q))


HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def torch_style_adamw(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW's single-tensor update (its op forms: lerp, addcmul, addcdiv), written out."""
    param.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.addcdiv_(m, denom, value=-lr / (1 - beta1**step))


def test_nvfp4_adamw_matches_torch_adamw_then_nearest_rounding():
    q, m, v, _, g = adamw_state((8, 64), 0)
    param = R.dequantize_nvfp4(q, torch.float32)
    m_torch, v_torch = m.clone(), v.clone()
    for step in (1, 2, 3):
        grad = torch.randn(param.shape, generator=g)
        torch_style_adamw(param, grad, m_torch, v_torch, step, **HYPER)
        R.nvfp4_adamw_(q, grad, m, v, step=step, **HYPER, rule="nearest", seed=0)
        torch.testing.assert_close(m, m_torch, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(v, v_torch, rtol=1e-5, atol=1e-12)
        # ours stores torch's updated value rounded to a neighbouring code
        stored = R.dequantize_nvfp4(q, torch.float32)
        unit = (q.scales.float() * q.tensor_scale).repeat_interleave(16, dim=1)
        assert ((stored - param).abs() <= unit * 1.0 + 1e-7).all()
        assert (stored != param).any()
        param = stored.clone()  # continue from the quantised value, as the NVFP4 optimizer does


def test_nvfp4_tensor_scale_grows_by_exact_powers_of_two_and_rescaling_is_lossless():
    q, m, v, _, _ = adamw_state((4, 64), 1)
    before = R.dequantize_nvfp4(q, torch.float32)
    st0 = q.tensor_scale.item()
    stats = R.nvfp4_adamw_(
        q, torch.zeros(4, 64), m, v, step=1, **{**HYPER, "weight_decay": 0.0}, rule="nearest", seed=0
    )
    assert q.tensor_scale.item() == 4 * st0  # the largest block scale 448 -> 112
    assert q.scales.float().max() <= 112
    assert torch.equal(R.dequantize_nvfp4(q, torch.float32), before) and stats.flips.item() == 0
    R.nvfp4_adamw_(q, torch.zeros(4, 64), m, v, step=2, **{**HYPER, "weight_decay": 0.0}, rule="nearest", seed=0)
    assert q.tensor_scale.item() == 4 * st0  # steady: no change without growth


def test_nvfp4_adamw_counts_saturated_blocks_when_weights_outgrow_the_headroom():
    q, m, v, _, _ = adamw_state((2, 32), 2)
    grad = -torch.ones(2, 32)
    stats = R.nvfp4_adamw_(
        q, grad, m, v, step=1, lr=1.0, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, rule="nearest", seed=0
    )
    assert stats.saturated.item() > 0
    metrics = stats.metrics("precision/layer00")
    assert set(metrics) == {
        "precision/layer00/flip_frac",
        "precision/layer00/quant_err",
        "precision/layer00/saturated_blocks",
    }


@pytest.mark.parametrize("rule", ["seed", "stochastic"])
def test_nvfp4_random_rules_are_pure_functions_of_seed_step_and_index(rule):
    q0, m0, v0, _, g = adamw_state((4, 64), 3)
    grad = torch.randn(4, 64, generator=g)
    # beta1 = beta2 = 0: no bias correction, so the step only enters through the random stream
    hyper = dict(lr=1e-3, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0)

    def run(seed, step):
        q, m, v = clone_q(q0), m0.clone(), v0.clone()
        R.nvfp4_adamw_(q, grad, m, v, step=step, **hyper, rule=rule, seed=seed)
        return q.codes

    assert torch.equal(run(7, 5), run(7, 5))
    assert not torch.equal(run(7, 5), run(7, 6))
    assert not torch.equal(run(7, 5), run(8, 5))
    assert R.stream_key(7, 5) == R.stream_key(7, 5) != R.stream_key(7, 5 + 2**32)


def test_tiny_updates_stick_with_nearest_and_move_with_seed_dither_and_stochastic_rounding():
    flips = {}
    for rule in R.RULES:
        q, m, v, residual, g = adamw_state((128, 256), 4, magnitude=1.0, rule=rule)
        grad = torch.randn(128, 256, generator=g)
        for step, lr in ((1, 0.0), (2, 1e-4)):  # step 1 only settles the tensor scale and the moments
            stats = R.nvfp4_adamw_(
                q, grad, m, v, step=step, **{**HYPER, "lr": lr}, rule=rule, seed=0, residual=residual
            )
        flips[rule] = stats.flips.item() / stats.numel
    assert flips["nearest"] == 0 and flips["residual"] == 0  # stored values sit on the grid, updates << half a step
    assert flips["seed"] > 0.02 and flips["stochastic"] > 1e-4
    assert flips["seed"] > 10 * flips["stochastic"]  # the dither moves codes whatever the update's size


def test_stochastic_rounding_is_unbiased_and_stays_on_neighbouring_codes():
    g = torch.Generator().manual_seed(5)
    y = (torch.rand(64, generator=g) * 14 - 7).repeat(20000, 1)
    u = torch.rand(y.shape, generator=g)
    got = R.e2m1_decode(R.e2m1_stochastic(y, u))
    clipped = y[0].clamp(-6, 6)
    torch.testing.assert_close(got.mean(0), clipped, atol=0.03, rtol=0)
    down = R.e2m1_decode(R.e2m1_stochastic(y[:1], torch.full((1, 64), 1 - 2.0**-24)))  # never rounds up
    up = R.e2m1_decode(R.e2m1_stochastic(y[:1], torch.zeros(1, 64)))  # always rounds up
    assert ((got == down) | (got == up)).all()


def test_residual_rule_keeps_the_update_in_the_error_feedback_buffer():
    q, m, v, residual, g = adamw_state((8, 64), 6, rule="residual")
    for step in (1, 2, 3):
        master = R.dequantize_nvfp4(q, torch.float32) + residual.float()
        grad = torch.randn(8, 64, generator=g)
        c = R.AdamWConstants.of(step, **{k: HYPER[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")})
        _, _, update = R.adamw_moments(grad, m.clone(), v.clone(), c)
        target = master * c.decay - update
        R.nvfp4_adamw_(q, grad, m, v, step=step, **HYPER, rule="residual", seed=0, residual=residual)
        kept = R.dequantize_nvfp4(q, torch.float32) + residual.float()
        assert ((kept - target).abs() <= target.abs().max() * 2.0**-8 * 0.2).all()  # only bf16 rounding of r is lost


# ---------------------------------------------------------------------------------------------------------
# Public API: refusals, bytes, CPU path
# ---------------------------------------------------------------------------------------------------------


def test_precision_verdicts_and_refusals(monkeypatch):
    assert "reference" in nk.check_precision_supported("fp8", "cpu")
    assert "bf16" in lowprec.precision_verdict("nvfp4", (9, 0), "H100")
    assert "Hopper has no FP4 tensor cores" in lowprec.precision_verdict("nvfp4", (9, 0), "H100")
    assert "E4M3" in lowprec.precision_verdict("fp8", (9, 0), "H100")
    with pytest.raises(nk.UnsupportedInput, match=r"Blackwell \(sm_100a.*'nvfp4' \(NVFP4 storage"):
        lowprec.precision_verdict("nvfp4_gemm", (9, 0), "H100")
    with pytest.raises(nk.UnsupportedInput, match="MXFP8 tensor-core GEMMs need Blackwell"):
        lowprec.precision_verdict("mxfp8", None)
    with pytest.raises(nk.UnsupportedInput, match="no such kernel yet"):
        lowprec.precision_verdict("nvfp4_gemm", (10, 0), "B200")
    with pytest.raises(nk.UnsupportedInput, match=r"sm_89\+"):
        lowprec.precision_verdict("fp8", (8, 0), "A100")
    with pytest.raises(nk.UnsupportedInput, match="sm_90 .Hopper. and sm_100"):
        lowprec.precision_verdict("fp8", (8, 9), "L4")
    with pytest.raises(nk.UnsupportedInput, match="unknown precision 'fp4'"):
        nk.check_precision_supported("fp4", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    assert "NVIDIA H100" in nk.check_precision_supported("fp8", "cuda:0")
    with pytest.raises(nk.UnsupportedInput, match="NVIDIA H100 is sm_90"):
        nk.check_precision_supported("nvfp4_gemm", "cuda")


def test_expert_param_bytes():
    assert nk.expert_param_bytes("bf16")["total"] == 12
    assert nk.expert_param_bytes("fp8")["total"] == 12
    assert nk.expert_param_bytes("nvfp4", "seed")["total"] == 8.5625
    assert nk.expert_param_bytes("nvfp4", "residual") == dict(
        weights=0.5625, exp_avg=4.0, exp_avg_sq=4.0, residual=2.0, total=10.5625, transient=2.0
    )
    with pytest.raises(nk.UnsupportedInput, match="unknown NVFP4 rounding rule"):
        nk.expert_param_bytes("nvfp4", "dither")


def test_nvfp4_adamw_refuses_bad_input():
    q, m, v, _, _ = adamw_state((2, 32), 0)
    grad = torch.zeros(2, 32)
    kw = dict(step=1, **HYPER, seed=0)
    with pytest.raises(nk.UnsupportedInput, match="unknown NVFP4 rounding rule"):
        nk.nvfp4_adamw_(q, grad, m, v, rule="magic", **kw)
    with pytest.raises(nk.UnsupportedInput, match="exactly with rule='residual'"):
        nk.nvfp4_adamw_(q, grad, m, v, rule="residual", **kw)
    with pytest.raises(nk.UnsupportedInput, match="grad must be a contiguous"):
        nk.nvfp4_adamw_(q, grad.half(), m, v, rule="nearest", **kw)
    with pytest.raises(nk.UnsupportedInput, match="exp_avg must be"):
        nk.nvfp4_adamw_(q, grad, m[:1], v, rule="nearest", **kw)
    with pytest.raises(nk.UnsupportedInput, match="step must be"):
        nk.nvfp4_adamw_(q, grad, m, v, rule="nearest", **{**kw, "step": 0})
    with pytest.raises(nk.UnsupportedInput, match="multiple of 16"):
        nk.quantize_nvfp4(torch.zeros(3, 24))


def test_fp8_ops_refuse_bad_input():
    offsets = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(nk.UnsupportedInput, match="scaling must be one of"):
        nk.grouped_mm_fp8(torch.randn(4, 16), torch.randn(1, 16, 16), offsets, "tensorwise")
    with pytest.raises(nk.UnsupportedInput, match="fast_accum applies to scaling='rowwise' only"):
        nk.expert_mlp_fp8(
            torch.randn(4, 16), offsets, torch.randn(1, 16, 32), torch.randn(1, 16, 16), "blockwise", fast_accum=True
        )
    with pytest.raises(nk.UnsupportedInput, match="bools"):
        nk.grouped_mm_fp8(torch.randn(4, 16), torch.randn(1, 16, 16), offsets, wgrad_fp8="bf16")
    with pytest.raises(nk.UnsupportedInput, match="float16"):
        nk.grouped_mm_fp8(torch.randn(4, 16).half(), torch.randn(1, 16, 16), offsets)
    with pytest.raises(nk.UnsupportedInput, match=r"\[E,H,D\]"):
        nk.expert_mlp_fp8(torch.randn(4, 16), offsets, torch.randn(1, 16, 32), torch.randn(1, 8, 16))
    with pytest.raises(nk.UnsupportedInput, match=r"\(128,128\) tiles"):
        nk.quantize_fp8_blockwise(torch.randn(2, 4, 4), (1, 128))
    with pytest.raises(ValueError, match="non-decreasing"):
        nk.grouped_mm_fp8(torch.randn(4, 16), torch.randn(2, 16, 16), torch.tensor([3, 1], dtype=torch.int32))
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(nk.UnsupportedInput, match="topk_weights must be float"):
        nk.moe_experts_fp8(torch.randn(4, 16), ids, torch.ones(4, 3), torch.randn(1, 16, 32), torch.randn(1, 16, 16))
    with pytest.raises(nk.UnsupportedInput, match="float16"):
        nk.moe_experts_fp8(
            torch.randn(4, 16).half(), ids, torch.ones(4, 2), torch.randn(1, 16, 32), torch.randn(1, 16, 16)
        )
    with pytest.raises(nk.UnsupportedInput, match="fast_accum applies"):
        nk.moe_experts_fp8(
            torch.randn(4, 16), ids, torch.ones(4, 2), torch.randn(1, 16, 32), torch.randn(1, 16, 16), "blockwise",
            fast_accum=True,
        )  # fmt: skip


@pytest.mark.parametrize("scaling", R.SCALINGS)
def test_moe_experts_fp8_reference_is_the_fp8_expert_mlp_between_gather_and_weighted_combine(scaling):
    """Forward: exactly dispatch -> expert_mlp_fp8 -> weighted combine. Backward: dy is quantised before the routing
    weight is applied, so gradients agree with that composition to fp8 precision, and the routing-weight gradient
    is <dL/d(expert output), expert output>."""
    g = torch.Generator().manual_seed(4)
    n_tokens, top_k, n_experts, d, h = 24, 2, 3, 32, 16
    ids = torch.randint(0, n_experts, (n_tokens, top_k), generator=g)
    ids[3, 1] = -1
    x = torch.randn(n_tokens, d, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(n_tokens, top_k, generator=g, dtype=torch.float64, requires_grad=True)
    w_up = (torch.randn(n_experts, d, 2 * h, generator=g, dtype=torch.float64) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, generator=g, dtype=torch.float64) / h**0.5).requires_grad_()
    leaves = (x, weights, w_up, w_down)
    y = R.moe_experts_fp8(x, ids, weights, w_up, w_down, scaling, torch.float64)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, leaves, dy)

    routing = nk.sort_by_expert(ids, n_experts)
    token = routing.order // top_k
    kept = int(routing.offsets[-1])
    out = R.expert_mlp_fp8(x[token], routing.offsets, w_up, w_down, scaling, torch.float64)
    slot_weight = weights.reshape(-1)[routing.order[:kept]]
    y_composed = torch.zeros_like(x).index_add(0, token[:kept], out[:kept] * slot_weight[:, None])
    assert torch.equal(y.detach(), y_composed.detach())
    want = torch.autograd.grad(y_composed, leaves, dy)
    for name, a, b in zip(("x", "weights", "w_up", "w_down"), got, want):
        assert ((a - b).norm() / b.norm()).item() < 0.08, name
    assert got[1][3, 1] == 0


def test_fp8_gemm_error_vs_exact_math_is_e4m3_sized():
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([100, 100, 250], dtype=torch.int32)
    x, w = torch.randn(260, 256, generator=g), torch.randn(3, 256, 96, generator=g)
    exact = grouped_mm(x, w, offsets)
    for scaling in R.SCALINGS:
        err = rel_err(nk.grouped_mm_fp8(x, w, offsets, scaling), exact)
        assert 0.005 < err < 0.05, (scaling, err)


@given(st.integers(1, 20000), st.integers(1, 6), st.sampled_from([1, 16, 64]))
def test_pow2_parts_cover_the_width_with_descending_powers_of_two(n, max_parts, smallest):
    from nmoe.kernels._lowprec_ops import pow2_parts

    parts = pow2_parts(n, max_parts, smallest)
    used = [p for p in parts if p]
    assert len(parts) == max_parts and parts[: len(used)] == tuple(used)  # zeros only at the end
    assert all(p & (p - 1) == 0 and p >= min(smallest, p) for p in used)
    assert used == sorted(used, reverse=True) and sum(used) >= n
    assert sum(used) - n < max(used[-1], smallest)  # only the last part pads
    if bin(n).count("1") <= max_parts and n % smallest == 0:  # exact when n has few enough bits
        assert sum(used) == n
