"""The reference ops (the CPU path and the oracle) against naive per-token loops, and input validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nmoe.kernels as nk
from nmoe.kernels import reference


def naive_moe(x, ids, weights, w_up, w_down):
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (x[t] @ w_up[e]).chunk(2)
            y[t] += weights[t, k] * ((torch.nn.functional.silu(gate) * up) @ w_down[e])
    return y


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_moe_reference_matches_per_token_loop(n_tokens, top_k, n_experts, seed):
    g = torch.Generator().manual_seed(seed)
    d, h = 8, 6
    x = torch.randn(n_tokens, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, n_experts, (n_tokens, top_k), generator=g)
    weights = torch.rand(n_tokens, top_k, generator=g, dtype=torch.float64)
    w_up = torch.randn(n_experts, d, 2 * h, generator=g, dtype=torch.float64)
    w_down = torch.randn(n_experts, h, d, generator=g, dtype=torch.float64)
    got = nk.moe_experts(x, ids, weights, w_up, w_down)
    torch.testing.assert_close(got, naive_moe(x, ids, weights, w_up, w_down))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 30), st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_sort_by_expert_is_a_stable_grouping(n_tokens, top_k, n_experts, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_experts, (n_tokens, top_k), generator=g)
    counts, offsets, order = nk.sort_by_expert(ids, n_experts)
    flat = ids.reshape(-1)
    assert counts.dtype == offsets.dtype == torch.int32 and order.dtype == torch.int64
    assert counts.tolist() == [int((flat == e).sum()) for e in range(n_experts)]
    assert offsets.tolist() == torch.cumsum(counts, 0).tolist()
    expected = [i for e in range(n_experts) for i in range(flat.numel()) if flat[i] == e]
    assert order.tolist() == expected


def test_grouped_mm_reference_rows_use_their_expert_and_tail_is_zero():
    x = torch.randn(7, 4, dtype=torch.float64)
    w = torch.randn(3, 4, 5, dtype=torch.float64)
    offsets = torch.tensor([2, 2, 5], dtype=torch.int32)
    out = nk.grouped_mm(x, w, offsets)
    torch.testing.assert_close(out[:2], x[:2] @ w[0])
    torch.testing.assert_close(out[2:5], x[2:5] @ w[2])
    assert out[5:].eq(0).all()


@pytest.mark.parametrize(
    "x_shape,w_shape,offsets",
    [
        ((4, 3), (2, 4, 5), [1, 4]),  # K mismatch
        ((4, 4), (2, 4, 5), [1, 2, 4]),  # offsets length != E
        ((4, 4), (2, 4, 5), None),
    ],  # int64 offsets
)
def test_grouped_mm_refuses_bad_shapes(x_shape, w_shape, offsets):
    off = torch.tensor([1, 4]) if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    with pytest.raises(nk.UnsupportedInput):
        nk.grouped_mm(torch.randn(x_shape), torch.randn(w_shape), off)


def test_moe_experts_refuses_mismatched_weights():
    x, ids, wts = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.int64), torch.rand(3, 2)
    with pytest.raises(nk.UnsupportedInput, match="w_down"):
        nk.moe_experts(x, ids, wts, torch.randn(2, 8, 12), torch.randn(2, 5, 8))
    with pytest.raises(nk.UnsupportedInput, match="topk_ids"):
        nk.moe_experts(x, ids.float(), wts, torch.randn(2, 8, 12), torch.randn(2, 6, 8))


def test_unsupported_device_is_refused():
    x = torch.empty(4, 16, device="meta")
    with pytest.raises(nk.UnsupportedInput, match="meta"):
        nk.grouped_mm(x, torch.empty(2, 16, 16, device="meta"), torch.empty(2, dtype=torch.int32, device="meta"))


def test_import_does_not_load_triton_kernels():
    import subprocess
    import sys

    code = "import sys, nmoe.kernels; assert 'nmoe.kernels._kernels' not in sys.modules; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert reference.swiglu(torch.tensor([[0.0, 2.0]])).item() == 0.0
