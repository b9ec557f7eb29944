"""The custom ops (namespace "nmoe"): opcheck, and a small MoE-like model under torch.compile(fullgraph=True)
giving the same loss and gradients as eager (CPU: the reference runs inside the ops)."""

import pytest
import torch

import nmoe.kernels as nk
from nmoe.kernels import _ops  # noqa: F401  (registers torch.ops.nmoe.*)


def expert_weights(g, n_experts=4, d=16, h=16, dtype=torch.float32):
    w_up = torch.randn(n_experts, d, 2 * h, generator=g, dtype=dtype) / d**0.5
    w_down = torch.randn(n_experts, h, d, generator=g, dtype=dtype) / h**0.5
    return w_up, w_down


def op_samples():
    g = torch.Generator().manual_seed(0)
    w_up, w_down = expert_weights(g)
    x = torch.randn(10, 16, generator=g)
    ids = torch.tensor([[0, 1], [2, -1], [3, 0], [-1, -1], [1, 2]] * 2)
    weights = torch.rand(10, 2, generator=g)
    offsets = torch.tensor([2, 2, 6, 9], dtype=torch.int32)
    pre = torch.randn(10, 32, generator=g)
    act = torch.randn(10, 16, generator=g)
    head = torch.randn(40, 16, generator=g)
    targets = torch.randint(0, 40, (10,), generator=g)
    targets[4] = -100

    def grad(t):
        return t.clone().requires_grad_()

    return {
        "grouped_mm": [(grad(x), grad(w_down), offsets)],
        "grouped_mm_backward": [(x, x, w_down, offsets, True, True), (x, x, w_down, offsets, False, True)],
        "expert_mlp": [(grad(x), offsets, grad(w_up), grad(w_down))],
        "expert_mlp_backward": [(x, x, offsets, w_up, w_down, pre, act)],
        "moe_experts": [  # the second: bf16 tokens, float32 master weights
            (grad(x), ids, grad(weights), grad(w_up), grad(w_down)),
            (grad(x.bfloat16()), ids, grad(weights), grad(w_up), grad(w_down)),
        ],
        "moe_experts_fp8": [  # the model's recipe (rowwise, bf16 dW: act kept), and one keeping no act
            (grad(x.bfloat16()), ids, grad(weights), grad(w_up), grad(w_down), "rowwise", False, True),
            (grad(x), ids, grad(weights), grad(w_up), grad(w_down), "rowwise", True, False),
        ],
        "linear_cross_entropy": [
            (grad(x), grad(head), targets, 4, -100, True),
            (x, head, targets, 3, -100, False),
        ],
    }


@pytest.mark.parametrize("name,args", [(n, a) for n, cases in op_samples().items() for a in cases])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.nmoe, name).default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_moe_experts_backward(dtype):
    """dtype: the tokens'; the weights stay float32 (masters, cast for the GEMMs, under bf16)."""
    g = torch.Generator().manual_seed(1)
    w_up, w_down = expert_weights(g)
    x, ids, weights = torch.randn(6, 16, generator=g), torch.tensor([[0, 1], [2, -1], [3, 0]] * 2), torch.rand(6, 2)
    x = x.to(dtype)
    _, pre, act, offsets, order, token, pos, cast_up, cast_down = torch.ops.nmoe.moe_experts(
        x, ids, weights, w_up, w_down
    )
    assert cast_up.numel() == (0 if dtype == torch.float32 else w_up.numel())
    dy = torch.randn(6, 16, generator=g).to(dtype)
    args = (dy, x, weights, w_up, w_down, cast_up, cast_down, offsets, order, token, pos, pre, act)
    torch.library.opcheck(torch.ops.nmoe.moe_experts_backward.default, args)
    dw_up, dw_down = torch.ops.nmoe.moe_experts_backward(*args)[2:]
    assert dw_up.dtype == dw_down.dtype == torch.float32


@pytest.mark.parametrize("recipe", [("rowwise", False, True), ("rowwise", True, True), ("blockwise", True, False)])
def test_opcheck_moe_experts_fp8_backward(recipe):
    """The fp8 op's backward on its forward's saved outputs (act [R,H] as values or codes, or the [0] placeholder;
    x's codes with the fp8 dW), float32 masters under bf16 tokens: gradients in the inputs' dtypes."""
    g = torch.Generator().manual_seed(1)
    w_up, w_down = expert_weights(g)
    x = torch.randn(6, 16, generator=g).bfloat16()
    ids, weights = torch.tensor([[0, 1], [2, -1], [3, 0]] * 2), torch.rand(6, 2)
    y, *saved = torch.ops.nmoe.moe_experts_fp8(x, ids, weights, w_up, w_down, *recipe)
    codes = recipe[0] == "rowwise" and recipe[1]
    assert saved[5].shape == ((0,) if recipe[0] == "blockwise" else (12, 16))  # act, or its placeholder
    assert saved[7].shape == ((6, 16) if codes else (0,)) and saved[8].shape == ((6,) if codes else (0,))  # x codes
    args = (torch.randn(6, 16, generator=g).bfloat16(), x, weights, w_up, w_down, *saved, *recipe)
    torch.library.opcheck(torch.ops.nmoe.moe_experts_fp8_backward.default, args)
    dx, d_weights, dw_up, dw_down = torch.ops.nmoe.moe_experts_fp8_backward(*args)
    assert dx.dtype == torch.bfloat16 and dw_up.dtype == dw_down.dtype == d_weights.dtype == torch.float32


class TinyMoEFP8(torch.nn.Module):
    """Router -> moe_experts_fp8 (the model's fp8 layer: float32 masters, dropped slots) -> fused head loss."""

    def __init__(self, g, n_experts=4, d=16, vocab=40):
        super().__init__()
        w_up, w_down = expert_weights(g, n_experts, d)
        self.w_up, self.w_down = torch.nn.Parameter(w_up), torch.nn.Parameter(w_down)
        self.gate = torch.nn.Parameter(torch.randn(n_experts, d, generator=g))
        self.head = torch.nn.Parameter(torch.randn(vocab, d, generator=g) / d**0.5)

    def forward(self, x, targets):
        weights, ids = torch.sigmoid(x @ self.gate.T).topk(2, dim=1)
        ids = torch.where(weights > 0.9, -1, ids)
        y = nk.moe_experts_fp8(x, ids, weights, self.w_up, self.w_down, wgrad_fp8=False, fast_accum=True)
        return nk.linear_cross_entropy(torch.tanh(y) + x, self.head, targets, chunk_size=5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fp8_experts_compile_fullgraph_and_match_eager(backend):
    """moe_experts_fp8 is one custom op (as moe_experts): torch.compile traces the fp8 layer whole, where the
    autograd.Function it replaced broke the graph (data-dependent group sizes on CPU, the Triton launchers on GPU)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    model = TinyMoEFP8(g)
    x = torch.randn(14, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (14,), generator=g)

    def loss_and_grads(fn):
        for p in [x, *model.parameters()]:
            p.grad = None
        loss = fn(x, targets)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in [x, *model.parameters()]]

    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend=backend))
    for want, got in zip(eager, compiled):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class TinyMoE(torch.nn.Module):
    """Router -> moe_experts (with capacity-dropped slots) -> expert_mlp and grouped_mm -> fused head loss."""

    def __init__(self, g, n_experts=4, d=16, vocab=40):
        super().__init__()
        w_up, w_down = expert_weights(g, n_experts, d)
        self.w_up, self.w_down = torch.nn.Parameter(w_up), torch.nn.Parameter(w_down)
        self.gate = torch.nn.Parameter(torch.randn(n_experts, d, generator=g))
        self.head = torch.nn.Parameter(torch.randn(vocab, d, generator=g) / d**0.5)
        self.register_buffer("offsets", torch.tensor([3, 3, 9, 12], dtype=torch.int32))

    def forward(self, x, targets):
        weights, ids = torch.sigmoid(x @ self.gate.T).topk(2, dim=1)
        ids = torch.where(weights > 0.9, -1, ids)  # stands in for a capacity limit
        y = nk.moe_experts(x, ids, weights, self.w_up, self.w_down)
        z = nk.expert_mlp(y, self.offsets, self.w_up, self.w_down) + nk.grouped_mm(y, self.w_down, self.offsets)
        return nk.linear_cross_entropy(torch.tanh(z) + x, self.head, targets, chunk_size=5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    model = TinyMoE(g)
    x = torch.randn(14, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (14,), generator=g)

    def loss_and_grads(fn):
        for p in [x, *model.parameters()]:
            p.grad = None
        loss = fn(x, targets)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in [x, *model.parameters()]]

    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend=backend))
    for want, got in zip(eager, compiled):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_graph_refuses_bad_input_at_trace_time():
    torch._dynamo.reset()
    x, w = torch.randn(4, 16), torch.randn(2, 16, 8)
    offsets = torch.tensor([1, 4], dtype=torch.int32)
    fn = torch.compile(nk.grouped_mm, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x, w, offsets), nk.grouped_mm(x, w, offsets))
    with pytest.raises(Exception, match="offsets must be int32"):  # dynamo wraps the UnsupportedInput
        fn(x, w, offsets.long())


def test_flop_counter_sees_the_ops():
    """FlopCounterMode cannot look inside an op: registered formulas count the GEMMs (fwd + bwd = 3x fwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    w_up, w_down = (t.requires_grad_() for t in expert_weights(g))
    x = torch.randn(10, 16, generator=g, requires_grad=True)
    ids, weights = torch.randint(0, 4, (10, 2), generator=g), torch.rand(10, 2, generator=g, requires_grad=True)
    head, targets = torch.randn(40, 16, generator=g, requires_grad=True), torch.randint(0, 40, (10,), generator=g)
    with FlopCounterMode(display=False) as counter:
        y = nk.moe_experts(x, ids, weights, w_up, w_down)
        z = nk.expert_mlp(y, torch.tensor([3, 3, 9, 10], dtype=torch.int32), w_up, w_down)
        loss = nk.linear_cross_entropy(
            nk.grouped_mm(
                z, w_down.transpose(1, 2)[:, :, :16].contiguous(), torch.tensor([2, 4, 6, 10], dtype=torch.int32)
            ),
            head,
            targets,
        )
        loss.backward()
    expert = 2 * 16 * 32 + 2 * 16 * 16  # per row: up [16 -> 32] + down [16 -> 16]
    want = 3 * (20 * expert + 10 * expert + 2 * 10 * 16 * 16 + 2 * 10 * 16 * 40)
    assert counter.get_total_flops() == want
    with FlopCounterMode(display=False) as counter:
        nk.moe_experts_fp8(x, ids, weights, w_up, w_down, wgrad_fp8=False).sum().backward()
    assert counter.get_total_flops() == 3 * 20 * expert


def test_backward_materialises_no_gradients_for_the_saved_outputs():
    """pre/act (and the cast weights) are outputs only to be saved: autograd must not zero-fill [R,2H] / [R,H]
    gradients for them on every backward (that was 0.13-0.21 ms per moonlet MoE layer on an H100)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.fill_):
                self.shapes.append(tuple(out.shape))
            return out

    g = torch.Generator().manual_seed(2)
    w_up, w_down = (w.requires_grad_() for w in expert_weights(g))
    x = torch.randn(10, 16, generator=g, requires_grad=True)
    ids, weights = torch.randint(0, 4, (10, 2), generator=g), torch.rand(10, 2, generator=g, requires_grad=True)
    offsets = torch.tensor([5, 5, 12, 20], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):  # bf16: float32 masters, cast weights saved too
        y = nk.moe_experts(x.to(dtype), ids, weights, w_up, w_down)
        z = nk.expert_mlp(torch.cat([y, y]).float(), offsets, w_up, w_down)
        with Fills() as fills:
            z.sum().backward()
        saved = {(20, 32), (20, 16), tuple(w_up.shape), tuple(w_down.shape)}
        assert not saved & set(fills.shapes), fills.shapes
