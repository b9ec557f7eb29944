"""Every Triton kernel, run on CPU by the Triton interpreter, against the float64 reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nmoe.kernels as nk
from nmoe.kernels import reference

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("NMOE_KERNELS_FORCE_TRITON", "1")
    from nmoe.kernels import _triton_ops

    assert _triton_ops.INTERPRET, "nmoe.kernels._triton_ops was imported before TRITON_INTERPRET=1 was set"


@pytest.fixture(params=["pointer", "tma"])
def variant(request, monkeypatch):
    """Run a test with each grouped-GEMM variant; for "tma", check that TMA descriptors were really used.

    The variant holds for all of a hypothesis test's examples (hence the suppressed fixture health check).
    """
    from nmoe.kernels import _triton_ops

    made = []
    real = _triton_ops._descriptor
    monkeypatch.setattr(_triton_ops, "_descriptor", lambda t: made.append(t.shape) or real(t))
    with _triton_ops.use_gemm_variant(request.param):
        yield request.param
    assert bool(made) == (request.param == "tma")


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def float64_leaf(t):
    return t.detach().double().requires_grad_()


# Group-size layouts: random (with empty groups), all rows in one expert, everything empty.
layouts = st.sampled_from(["random", "one_huge", "sparse"])


def group_sizes(layout, n_experts, g):
    if layout == "one_huge":
        sizes = torch.zeros(n_experts, dtype=torch.int64)
        sizes[int(torch.randint(0, n_experts, (1,), generator=g))] = 70
        return sizes
    high = 2 if layout == "sparse" else 20
    return torch.randint(0, high, (n_experts,), generator=g)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layouts,
    st.integers(1, 6),
    st.sampled_from([16, 48]),
    st.sampled_from([16, 32]),
    st.integers(0, 20),
    st.integers(0, 2**31 - 1),
)
def test_grouped_mm_forward_and_grads(variant, layout, n_experts, k, n, tail, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = group_sizes(layout, n_experts, g)
    offsets = torch.cumsum(sizes, 0).to(torch.int32)
    m = int(sizes.sum()) + tail
    x = torch.randn(m, k, generator=g, requires_grad=True)
    w = torch.randn(n_experts, k, n, generator=g, requires_grad=True)
    out = nk.grouped_mm(x, w, offsets)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    x64, w64 = float64_leaf(x), float64_leaf(w)
    want = reference.grouped_mm(x64, w64, offsets)
    want.backward(grad.double())
    assert out.shape == (m, n) and torch.isfinite(out).all()
    assert rel_err(out, want) < 1e-5 and out[m - tail :].eq(0).all()
    if m:
        assert rel_err(x.grad, x64.grad) < 1e-5
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-4)  # empty groups: exactly 0


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 300),
    st.integers(1, 8),
    st.sampled_from([1, 8, 63, 64, 256]),
    st.booleans(),
    st.sampled_from([0.0, 0.3, 1.0]),
    st.integers(0, 2**31 - 1),
)
def test_sort_by_expert_matches_reference(n_tokens, top_k, n_experts, skewed, dropped, seed):
    g = torch.Generator().manual_seed(seed)
    high = 1 if skewed else n_experts
    ids = torch.randint(0, high, (n_tokens, top_k), generator=g, dtype=torch.int32)
    ids = torch.where(torch.rand(ids.shape, generator=g) < dropped, -1, ids).to(torch.int32)
    got = nk.sort_by_expert(ids, n_experts)
    want = reference.sort_by_expert(ids, n_experts)
    for name, a, b in zip(("counts", "offsets", "order"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def routing(n_tokens, top_k, n_experts, layout, g):
    if layout == "one_huge":
        ids = torch.zeros(n_tokens, top_k, dtype=torch.int64)
        ids[:, 1:] = torch.randint(0, n_experts, (n_tokens, top_k - 1), generator=g)
        return ids  # every token hits expert 0
    return (
        torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tokens)])
        if n_tokens
        else torch.zeros(0, top_k, dtype=torch.int64)
    )


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(0, 40),
    st.integers(1, 4),
    st.integers(4, 8),
    st.sampled_from([16, 32]),
    st.sampled_from([16, 48]),
    st.sampled_from(["random", "one_huge"]),
    st.sampled_from([0.0, 0.3, 1.0]),
    st.integers(0, 2**31 - 1),
)
def test_moe_experts_forward_and_grads(variant, n_tokens, top_k, n_experts, d, h, layout, dropped, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d, generator=g, requires_grad=True)
    ids = routing(n_tokens, top_k, n_experts, layout, g)
    ids = torch.where(torch.rand(ids.shape, generator=g) < dropped, -1, ids)
    weights = torch.rand(n_tokens, top_k, generator=g, requires_grad=True)
    w_up = (torch.randn(n_experts, d, 2 * h, generator=g) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, generator=g) / h**0.5).requires_grad_()
    y = nk.moe_experts(x, ids, weights, w_up, w_down)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    leaves64 = [float64_leaf(t) for t in (x, weights, w_up, w_down)]
    want = reference.moe_experts(leaves64[0], ids, *leaves64[1:])
    want.backward(grad.double())
    assert y.shape == (n_tokens, d)
    if n_tokens == 0:
        return
    assert rel_err(y, want) < 1e-5
    for name, got, ref in zip(("x", "weights", "w_up", "w_down"), (x, weights, w_up, w_down), leaves64):
        assert rel_err(got.grad, ref.grad) < 1e-5 or got.grad.sub(ref.grad).abs().max() < 1e-6, name
    assert weights.grad[ids < 0].eq(0).all()  # dropped slots: exactly zero gradient


def test_bf16_expert_path_within_bf16_rounding():
    g = torch.Generator().manual_seed(0)
    n_tokens, top_k, n_experts, d, h = 24, 2, 4, 32, 16
    ids = routing(n_tokens, top_k, n_experts, "random", g)
    fp32 = [
        torch.randn(n_tokens, d, generator=g),
        torch.rand(n_tokens, top_k, generator=g),
        torch.randn(n_experts, d, 2 * h, generator=g) / d**0.5,
        torch.randn(n_experts, h, d, generator=g) / h**0.5,
    ]
    bf16 = [t.bfloat16().requires_grad_() for t in fp32]
    leaves64 = [float64_leaf(t) for t in bf16]
    got = nk.moe_experts(bf16[0], ids, *bf16[1:])
    want = reference.moe_experts(leaves64[0], ids, *leaves64[1:])
    grad = torch.randn(got.shape, generator=g)
    got.backward(grad.bfloat16())
    want.backward(grad.double())
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2e-2
    for name, t, ref in zip(("x", "weights", "w_up", "w_down"), bf16, leaves64):
        assert t.grad.dtype == torch.bfloat16 and rel_err(t.grad, ref.grad) < 3e-2, name


def test_bf16_expert_path_on_float32_masters_casts_inside_and_returns_float32_weight_grads():
    """The model's bf16 call: the forward is the op on weights cast outside, bit for bit; the weight gradients come
    from the dW kernel's float32 accumulator (no bf16 round trip), closer to float64 than the bf16 ones."""
    g = torch.Generator().manual_seed(1)
    n_tokens, top_k, n_experts, d, h = 24, 2, 4, 32, 16
    ids = routing(n_tokens, top_k, n_experts, "random", g)
    x = torch.randn(n_tokens, d, generator=g).bfloat16()
    weights = torch.rand(n_tokens, top_k, generator=g)
    masters = [(torch.randn(n_experts, d, 2 * h, generator=g) / d**0.5).requires_grad_(),
               (torch.randn(n_experts, h, d, generator=g) / h**0.5).requires_grad_()]  # fmt: skip
    cast = [w.detach().bfloat16().requires_grad_() for w in masters]
    dy = torch.randn(n_tokens, d, generator=g).bfloat16()
    y_masters = nk.moe_experts(x, ids, weights, *masters)
    y_cast = nk.moe_experts(x, ids, weights, *cast)
    assert torch.equal(y_masters, y_cast)
    y_masters.backward(dy)
    y_cast.backward(dy)
    leaves64 = [float64_leaf(w) for w in cast]
    reference.moe_experts(float64_leaf(x), ids, float64_leaf(weights), *leaves64).backward(dy.double())
    for m, c, ref in zip(masters, cast, leaves64):
        assert m.grad.dtype == torch.float32
        # the same accumulator, rounded once (to nearest here; the interpreter's bf16 store truncates: one ulp)
        torch.testing.assert_close(m.grad.bfloat16(), c.grad, rtol=2**-7, atol=0)
        assert rel_err(m.grad, ref.grad) <= rel_err(c.grad, ref.grad)


def test_gpu_path_refuses_misaligned_dims_and_fp16():
    offsets = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(nk.UnsupportedInput, match="multiple of 16"):
        nk.grouped_mm(torch.randn(3, 24), torch.randn(1, 24, 16), offsets)
    with pytest.raises(nk.UnsupportedInput, match="float16"):
        nk.grouped_mm(torch.randn(3, 16).half(), torch.randn(1, 16, 16).half(), offsets)
    with pytest.raises(nk.UnsupportedInput, match="expected torch.float32"):
        nk.grouped_mm(torch.randn(3, 16), torch.randn(1, 16, 16).bfloat16(), offsets)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layouts,
    st.integers(1, 6),
    st.sampled_from([16, 32]),
    st.sampled_from([16, 48]),
    st.integers(0, 20),
    st.integers(0, 2**31 - 1),
)
def test_expert_mlp_forward_and_grads(variant, layout, n_experts, d, h, tail, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = group_sizes(layout, n_experts, g)
    offsets = torch.cumsum(sizes, 0).to(torch.int32)
    m = int(sizes.sum()) + tail
    rows = torch.randn(m, d, generator=g, requires_grad=True)
    w_up = (torch.randn(n_experts, d, 2 * h, generator=g) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, generator=g) / h**0.5).requires_grad_()
    y = nk.expert_mlp(rows, offsets, w_up, w_down)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    leaves64 = [float64_leaf(t) for t in (rows, w_up, w_down)]
    want = reference.expert_mlp(leaves64[0], offsets, *leaves64[1:])
    want.backward(grad.double())
    assert y.shape == (m, d) and y[m - tail :].eq(0).all() and rows.grad[m - tail :].eq(0).all()
    if m == tail:
        return
    assert rel_err(y, want) < 1e-5
    for name, got, ref in zip(("rows", "w_up", "w_down"), (rows, w_up, w_down), leaves64):
        assert rel_err(got.grad, ref.grad) < 1e-5 or got.grad.sub(ref.grad).abs().max() < 1e-6, name


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(2, 70),
    st.integers(1, 50),
    st.sampled_from([torch.float32, torch.bfloat16]),
    st.integers(0, 2**31 - 1),
)
def test_linear_cross_entropy_kernel(n, vocab, chunk, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, 16, generator=g) / 4).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = -100
    targets[0] = 0
    loss = nk.linear_cross_entropy(h, weight, targets, chunk_size=chunk)
    loss.backward()
    h64, w64 = float64_leaf(h), float64_leaf(weight)
    logits = h64 @ w64.T
    if dtype == torch.bfloat16:
        logits = logits.bfloat16().double()  # the GEMM's output is rounded to bf16 before the fp32 reduction
    want = torch.nn.functional.cross_entropy(logits, targets)
    want.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss.dtype == torch.float32 and abs(loss.item() - want.item()) <= tol * want.item()
    assert rel_err(h.grad, h64.grad) < tol and rel_err(weight.grad, w64.grad) < tol
