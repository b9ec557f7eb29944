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
            if e < 0:  # dropped slot
                continue
            gate, up = (x[t] @ w_up[e]).chunk(2)
            y[t] += weights[t, k] * ((torch.nn.functional.silu(gate) * up) @ w_down[e])
    return y


def drop_slots(ids, fraction, g):
    """Mark about `fraction` of the routing slots dropped (-1), as a capacity limit would."""
    return torch.where(torch.rand(ids.shape, generator=g) < fraction, -1, ids)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 20),
    st.integers(1, 4),
    st.integers(1, 6),
    st.sampled_from([0.0, 0.3, 1.0]),
    st.integers(0, 2**31 - 1),
)
def test_moe_reference_matches_per_token_loop(n_tokens, top_k, n_experts, dropped, seed):
    g = torch.Generator().manual_seed(seed)
    d, h = 8, 6
    x = torch.randn(n_tokens, d, generator=g, dtype=torch.float64)
    ids = drop_slots(torch.randint(0, n_experts, (n_tokens, top_k), generator=g), dropped, g)
    weights = torch.rand(n_tokens, top_k, generator=g, dtype=torch.float64)
    w_up = torch.randn(n_experts, d, 2 * h, generator=g, dtype=torch.float64)
    w_down = torch.randn(n_experts, h, d, generator=g, dtype=torch.float64)
    got = nk.moe_experts(x, ids, weights, w_up, w_down)
    torch.testing.assert_close(got, naive_moe(x, ids, weights, w_up, w_down))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 30), st.integers(1, 4), st.integers(1, 9), st.sampled_from([0.0, 0.4]), st.integers(0, 2**31 - 1))
def test_sort_by_expert_is_a_stable_grouping(n_tokens, top_k, n_experts, dropped, seed):
    g = torch.Generator().manual_seed(seed)
    ids = drop_slots(torch.randint(0, n_experts, (n_tokens, top_k), generator=g), dropped, g)
    counts, offsets, order = nk.sort_by_expert(ids, n_experts)
    flat = ids.reshape(-1)
    assert counts.dtype == offsets.dtype == torch.int32 and order.dtype == torch.int64
    assert counts.tolist() == [int((flat == e).sum()) for e in range(n_experts)]
    assert offsets.tolist() == torch.cumsum(counts, 0).tolist()
    expected = [i for e in [*range(n_experts), -1] for i in range(flat.numel()) if flat[i] == e]
    assert order.tolist() == expected  # dropped slots last, in slot order


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


def test_import_and_cpu_path_work_without_triton():
    """(torch's FLOP counter, which the ops register formulas with, imports triton when it is installed.)"""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now fails
        "import torch, nmoe.kernels as nk\n"
        "assert 'nmoe.kernels._kernels' not in sys.modules\n"
        "y = nk.grouped_mm(torch.ones(3, 4), torch.ones(1, 4, 2), torch.tensor([3], dtype=torch.int32))\n"
        "assert y.eq(4).all()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert reference.swiglu(torch.tensor([[0.0, 2.0]])).item() == 0.0


def test_dropped_slots_equal_running_only_the_kept_pairs():
    g = torch.Generator().manual_seed(3)
    n_tokens, top_k, n_experts, d, h = 16, 3, 5, 8, 6
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tokens)])
    ids = drop_slots(ids, 0.4, g)
    leaves = [
        torch.randn(n_tokens, d, generator=g, dtype=torch.float64),
        torch.rand(n_tokens, top_k, generator=g, dtype=torch.float64),
        torch.randn(n_experts, d, 2 * h, generator=g, dtype=torch.float64),
        torch.randn(n_experts, h, d, generator=g, dtype=torch.float64),
    ]
    got = [t.clone().requires_grad_() for t in leaves]
    y = nk.moe_experts(got[0], ids, *got[1:])
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(dy)
    # The kept pairs alone: one top-1 call per k over the tokens that kept their k-th slot.
    want = [t.clone().requires_grad_() for t in leaves]
    y_kept = torch.zeros_like(y)
    for k in range(top_k):
        keep = ids[:, k] >= 0
        y_kept = y_kept.index_add(
            0,
            keep.nonzero()[:, 0],
            nk.moe_experts(want[0][keep], ids[keep, k : k + 1], want[1][keep, k : k + 1], *want[2:]),
        )
    y_kept.backward(dy)
    torch.testing.assert_close(y, y_kept)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad)
    assert got[1].grad[ids < 0].eq(0).all()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 30), st.integers(1, 5), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_expert_mlp_reference_matches_per_row_loop(n_rows, n_experts, tail, seed):
    g = torch.Generator().manual_seed(seed)
    d, h = 8, 6
    sizes = torch.randint(0, n_experts, (n_rows,), generator=g).bincount(minlength=n_experts)
    offsets = torch.cumsum(sizes, 0).to(torch.int32)
    rows = torch.randn(n_rows + tail, d, generator=g, dtype=torch.float64)
    w_up = torch.randn(n_experts, d, 2 * h, generator=g, dtype=torch.float64)
    w_down = torch.randn(n_experts, h, d, generator=g, dtype=torch.float64)
    y = nk.expert_mlp(rows, offsets, w_up, w_down)
    expert_of_row = torch.repeat_interleave(torch.arange(n_experts), sizes)
    for r in range(n_rows):
        e = int(expert_of_row[r])
        torch.testing.assert_close(y[r], reference.swiglu(rows[r : r + 1] @ w_up[e])[0] @ w_down[e])
    assert y[n_rows:].eq(0).all()


def autograd_grads(fn, inputs, dy):
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    return torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dy)


def test_reference_backward_formulas_match_autograd():
    """The CPU path's backward (formulas, since autograd does not record inside an op) against autograd."""
    g = torch.Generator().manual_seed(5)
    n_experts, d, h = 4, 8, 6
    f64 = dict(generator=g, dtype=torch.float64)
    w_up, w_down = torch.randn(n_experts, d, 2 * h, **f64), torch.randn(n_experts, h, d, **f64)
    offsets = torch.tensor([3, 3, 9, 12], dtype=torch.int32)
    rows = torch.randn(15, d, **f64)
    dy = torch.randn(15, d, **f64)
    want = autograd_grads(lambda r, wu, wd: reference.expert_mlp(r, offsets, wu, wd), (rows, w_up, w_down), dy)
    _, pre, act = reference.expert_mlp_parts(rows, offsets, w_up, w_down)
    got = reference.expert_mlp_backward(dy, rows, offsets, w_up, w_down, pre, act)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    dy_n = torch.randn(15, d, **f64)
    want = autograd_grads(lambda a, w: reference.grouped_mm(a, w, offsets), (act, w_down), dy_n)
    for a, b in zip(reference.grouped_mm_backward(dy_n, act, w_down, offsets), want):
        torch.testing.assert_close(a, b)
    ids = drop_slots(torch.randint(0, n_experts, (10, 3), generator=g), 0.3, g)
    x, weights, dy_t = torch.randn(10, d, **f64), torch.rand(10, 3, **f64), torch.randn(10, d, **f64)
    want = autograd_grads(
        lambda x_, w_, wu, wd: reference.moe_experts(x_, ids, w_, wu, wd), (x, weights, w_up, w_down), dy_t
    )
    _, pre, act, *routing = reference.moe_experts_parts(x, ids, weights, w_up, w_down)
    for a, b in zip(reference.moe_experts_backward(dy_t, x, weights, w_up, w_down, *routing, pre, act), want):
        torch.testing.assert_close(a, b)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 40), st.integers(2, 50), st.integers(1, 64), st.booleans(), st.integers(0, 2**31 - 1))
def test_linear_cross_entropy_matches_cross_entropy_of_the_logits(n, vocab, chunk, with_ignored, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    if with_ignored:
        targets[torch.rand(n, generator=g) < 0.3] = -100
        targets[0] = 1  # at least one counted row
    loss = nk.linear_cross_entropy(h, weight, targets, chunk_size=chunk)
    (3 * loss).backward()
    h_ref, w_ref = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(h_ref @ w_ref.T, targets)
    (3 * want).backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(weight.grad, w_ref.grad)


def test_linear_cross_entropy_bf16_with_fp32_master_weight():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 16, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(30, 16, generator=g) / 4).requires_grad_()
    targets = torch.randint(0, 30, (20,), generator=g)
    loss = nk.linear_cross_entropy(h, weight, targets, chunk_size=7)
    loss.backward()
    h64, w64 = h.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = torch.nn.functional.cross_entropy(h64 @ w64.bfloat16().double().T, targets)
    want.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert abs(loss.item() - want.item()) < 2e-2 * want.item()
    assert (h.grad.double() - h64.grad).norm() / h64.grad.norm() < 2e-2
    assert (weight.grad.double() - w64.grad).norm() / w64.grad.norm() < 2e-2


def test_linear_cross_entropy_without_grad_and_refusals():
    h, weight, targets = torch.randn(5, 8), torch.randn(7, 8), torch.randint(0, 7, (5,))
    with torch.no_grad():
        got = nk.linear_cross_entropy(h, weight, targets, chunk_size=2)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(h @ weight.T, targets))
    with pytest.raises(nk.UnsupportedInput, match="int64"):
        nk.linear_cross_entropy(h, weight, targets.int())
    with pytest.raises(nk.UnsupportedInput, match=r"\[N,D\], \[V,D\]"):
        nk.linear_cross_entropy(h, weight[:, :4], targets)
    with pytest.raises(nk.UnsupportedInput, match="chunk_size"):
        nk.linear_cross_entropy(h, weight, targets, chunk_size=0)


def test_out_of_range_expert_ids_are_refused_on_cpu():
    x, wts = torch.randn(3, 8), torch.rand(3, 2)
    w_up, w_down = torch.randn(2, 8, 12), torch.randn(2, 6, 8)
    for bad in (-2, 2):
        ids = torch.tensor([[0, 1], [1, bad], [0, -1]])
        with pytest.raises(nk.UnsupportedInput, match="-1 marks a dropped slot"):
            nk.moe_experts(x, ids, wts, w_up, w_down)
