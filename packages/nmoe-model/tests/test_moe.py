"""MoE layer vs a naive per-token loop; routing invariants; bias balancing; losses and diagnostics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nmoe.kernels as nk
from nmoe.model import ModelConfig
from nmoe.model.dispatch import LocalDispatch
from nmoe.model.moe import MoE, balance_loss, capacity_ids, expert_mlp_of, fused_experts_of, route, z_loss


def moe_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=16,
        dim=12,
        n_layers=2,
        n_heads=2,
        n_dense_layers=1,
        inter_dim=16,
        n_routed_experts=8,
        moe_inter_dim=6,
        top_k=2,
    )
    base.update(overrides)
    return ModelConfig(**base)


def build_moe(cfg: ModelConfig, seed: int, dtype=torch.float64) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.5)
        moe.expert_bias.normal_(0.0, 0.3)
    return moe


def naive_select(biased: list[float], cfg: ModelConfig) -> list[int]:
    """Top-k ids by explicit sorting, honouring grouped routing."""
    n_exp = len(biased)
    allowed = set(range(n_exp))
    if cfg.n_groups > 1:
        size = n_exp // cfg.n_groups
        group_scores = []
        for g in range(cfg.n_groups):
            members = sorted(biased[g * size : (g + 1) * size], reverse=True)
            group_scores.append((sum(members[: min(2, size)]), g))
        best = [g for _, g in sorted(group_scores, reverse=True)[: cfg.topk_groups]]
        allowed = {g * size + i for g in best for i in range(size)}
    ranked = sorted(allowed, key=lambda e: biased[e], reverse=True)
    return ranked[: cfg.top_k]


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """y[T,D] computed token by token, expert by expert (the oracle)."""
    cfg = moe.cfg
    tokens, hidden = x.shape[0], cfg.moe_inter_dim
    choices, gates = [], []
    for t in range(tokens):
        logits = moe.gate @ x[t]
        scores = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, dim=0)
        biased = (scores.detach() + moe.expert_bias).tolist()
        ids = naive_select(biased, cfg)
        g = torch.stack([scores[e] for e in ids])
        if cfg.route_norm:
            g = g / g.sum()
        choices.append(ids)
        gates.append(g * cfg.route_scale)
    kept = [[True] * cfg.top_k for _ in range(tokens)]
    if cfg.capacity_factor > 0:  # token order: each expert keeps its first `cap` (token, k) slots
        cap = max(1, math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.n_routed_experts))
        used = [0] * cfg.n_routed_experts
        for t in range(tokens):
            for k in range(cfg.top_k):
                e = choices[t][k]
                kept[t][k] = used[e] < cap
                used[e] += kept[t][k]
    out = []
    for t in range(tokens):
        y = torch.zeros_like(x[t])
        for k, e in enumerate(choices[t]):
            if kept[t][k]:
                h = x[t] @ moe.w_up[e]
                y = y + gates[t][k] * ((F.silu(h[:hidden]) * h[hidden:]) @ moe.w_down[e])
        if moe.shared is not None:
            h = moe.shared.w13.weight @ x[t]
            half = h.shape[0] // 2
            y = y + moe.shared.w2.weight @ (F.silu(h[:half]) * h[half:])
        out.append(y)
    return torch.stack(out)


ROUTING_CASES = st.fixed_dictionaries(
    {
        "score_func": st.sampled_from(["sigmoid", "softmax"]),
        "route_norm": st.booleans(),
        "route_scale": st.sampled_from([1.0, 2.5]),
        "groups": st.sampled_from([(1, 1), (4, 2), (2, 1)]),
        "capacity_factor": st.sampled_from([0.0, 0.5, 1.0]),
        "n_shared_experts": st.integers(0, 2),
        "top_k": st.integers(1, 3),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=30, deadline=None)
@given(case=ROUTING_CASES)
def test_moe_matches_naive_loop_forward_and_grads(case):
    n_groups, topk_groups = case.pop("groups")
    seed = case.pop("seed")
    cfg = moe_config(n_groups=n_groups, topk_groups=topk_groups, **case)
    moe = build_moe(cfg, seed)
    x = torch.randn(2, 9, cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    probe = torch.randn(2, 9, cfg.dim, dtype=torch.float64)

    x1 = x.clone().requires_grad_(True)
    y, _ = moe(x1)
    grads = torch.autograd.grad((y * probe).sum(), [x1, *moe.parameters()])

    x2 = x.clone().requires_grad_(True)
    y_ref = naive_moe(moe, x2.view(-1, cfg.dim)).view_as(y)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x2, *moe.parameters()], allow_unused=True)

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for (name, _), g, g_ref in zip([("x", None), *moe.named_parameters()], grads, grads_ref):
        g_ref = torch.zeros_like(g) if g_ref is None else g_ref
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad of {n}: {m}")


@settings(max_examples=40, deadline=None)
@given(
    score_func=st.sampled_from(["sigmoid", "softmax"]),
    route_norm=st.booleans(),
    route_scale=st.floats(0.5, 3.0),
    top_k=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_routing_distinct_experts_and_weight_sums(score_func, route_norm, route_scale, top_k, seed):
    cfg = moe_config(score_func=score_func, route_norm=route_norm, route_scale=route_scale, top_k=top_k)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, cfg.dim, generator=gen, dtype=torch.float64)
    gate = torch.randn(cfg.n_routed_experts, cfg.dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(cfg.n_routed_experts, generator=gen, dtype=torch.float64)
    r = route(x, gate, bias, cfg)
    assert r.topk_ids.shape == (64, top_k)
    assert all(len(set(row)) == top_k for row in r.topk_ids.tolist())
    picked = r.scores.gather(1, r.topk_ids)
    expected = picked / picked.sum(-1, keepdim=True) * route_scale if route_norm else picked * route_scale
    torch.testing.assert_close(r.weights, expected.float() if r.weights.dtype == torch.float32 else expected)
    if route_norm:
        torch.testing.assert_close(r.weights.sum(-1), torch.full_like(r.weights[:, 0], route_scale))
    # the bias steers selection: chosen biased scores dominate every unchosen one
    biased = r.scores + bias
    chosen_min = biased.gather(1, r.topk_ids).min(-1).values
    unchosen = biased.scatter(1, r.topk_ids, float("-inf")).max(-1).values
    assert (chosen_min >= unchosen).all()


def test_capacity_limits_every_expert_and_counts_drops():
    cfg = moe_config(capacity_factor=0.5, top_k=2)
    moe = build_moe(cfg, seed=3)
    x = torch.randn(4, 16, cfg.dim, dtype=torch.float64)
    r = route(x.view(-1, cfg.dim), moe.gate, moe.expert_bias, cfg)
    ids = capacity_ids(r.topk_ids, cfg)
    cap = math.ceil(0.5 * 64 * 2 / cfg.n_routed_experts)
    kept = ids >= 0
    assert torch.bincount(ids[kept], minlength=cfg.n_routed_experts).max() <= cap
    assert (~kept).sum() > 0  # 50% capacity must drop something
    assert torch.equal(ids[kept], r.topk_ids[kept])
    moe(x)
    stats = moe.take_stats()
    assert stats[cfg.n_routed_experts + 3].item() == (~kept).sum().item()


def test_dropped_pairs_skip_the_experts():
    cfg = moe_config(capacity_factor=0.25, top_k=2, n_shared_experts=0)
    moe = build_moe(cfg, seed=4)
    x = torch.randn(2, 8, cfg.dim, dtype=torch.float64)
    calls = []

    class Spy:
        def experts(self, x, topk_ids, weights, w_up, w_down):
            calls.append(topk_ids)
            return LocalDispatch(cfg.n_routed_experts).experts(x, topk_ids, weights, w_up, w_down)

    moe.dispatcher = Spy()
    moe(x)
    (ids,) = calls
    assert (ids == -1).any()  # a capacity exists to save compute: dropped pairs never reach the expert GEMMs


def test_bias_updates_move_load_towards_balance():
    cfg = moe_config(n_routed_experts=16, top_k=2, bias_update_rate=0.02, n_shared_experts=0)
    moe = build_moe(cfg, seed=0, dtype=torch.float32)
    with torch.no_grad():
        moe.expert_bias.zero_()
        moe.gate[:4] += 1.5 * moe.gate[:4].sign()  # a few experts with much larger gate norms: skewed router
    gen = torch.Generator().manual_seed(1)

    def load_cv() -> float:
        counts = moe.load_since_update
        return (counts.std(unbiased=False) / counts.mean()).item()

    cvs = []
    with torch.no_grad():
        for _ in range(150):
            moe(torch.randn(4, 32, cfg.dim, generator=gen))
            cvs.append(load_cv())
            moe.update_bias()
    assert cvs[0] > 0.5, f"synthetic router not skewed enough: initial cv {cvs[0]:.3f}"
    assert sum(cvs[-20:]) / 20 < 0.4 * cvs[0], f"load cv {cvs[0]:.3f} -> {cvs[-20:]}"
    assert abs(moe.expert_bias.mean().item()) < 1e-5  # kept centred
    assert (moe.load_since_update == 0).all()


def test_balance_and_z_loss_match_formulas():
    cfg = moe_config(balance_loss_coef=0.1, z_loss_coef=0.01, score_func="sigmoid")
    moe = build_moe(cfg, seed=5)
    x = torch.randn(3, 10, cfg.dim, dtype=torch.float64)
    _, aux = moe(x)
    r = route(x.view(-1, cfg.dim), moe.gate, moe.expert_bias, cfg)
    n_exp, k = cfg.n_routed_experts, cfg.top_k
    expected_balance = 0.0
    for b in range(3):
        s = r.scores[b * 10 : (b + 1) * 10]
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.bincount(r.topk_ids[b * 10 : (b + 1) * 10].reshape(-1), minlength=n_exp) * n_exp / (k * 10)
        expected_balance += (f * p).sum() / 3
    expected_z = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in r.logits]).mean()
    torch.testing.assert_close(balance_loss(r.scores, r.topk_ids, 3, n_exp), expected_balance)
    torch.testing.assert_close(z_loss(r.logits), expected_z)
    torch.testing.assert_close(aux, 0.1 * expected_balance + 0.01 * expected_z)
    aux.backward()
    assert moe.gate.grad is not None and moe.gate.grad.abs().sum() > 0


def test_balanced_router_balance_loss_is_one():
    # uniform scores and perfectly spread assignments give f = 1 and P = 1/E for every expert: loss = 1
    scores = torch.full((8, 4), 0.5)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert balance_loss(scores, ids, 2, 4).item() == pytest.approx(1.0)


def test_stats_accumulate_counts_entropy_and_reset():
    cfg = moe_config(score_func="softmax")
    moe = build_moe(cfg, seed=7)
    x = torch.randn(2, 5, cfg.dim, dtype=torch.float64)
    r = route(x.view(-1, cfg.dim), moe.gate, moe.expert_bias, cfg)
    moe(x)
    moe(x)
    packed = moe.take_stats()
    n_exp = cfg.n_routed_experts
    counts = torch.bincount(r.topk_ids.reshape(-1), minlength=n_exp).double() * 2
    torch.testing.assert_close(packed[:n_exp], counts)
    entropy = -(r.scores * r.scores.log()).sum(-1).sum() * 2
    tokens, ent, max_gate, dropped = packed[n_exp : n_exp + 4].tolist()
    assert tokens == 20 and dropped == 0
    assert ent == pytest.approx(entropy.item())
    assert max_gate == pytest.approx(2 * r.gates.max(-1).values.sum().item())
    assert (moe.take_stats()[: n_exp + 4] == 0).all()  # reset on read
    assert (moe.load_since_update == counts).all()  # bias-update window is separate from the stats window


def test_dispatch_then_mlp_then_combine_equals_the_fused_path():
    cfg = moe_config(capacity_factor=0.5, top_k=2, n_shared_experts=0)
    moe = build_moe(cfg, seed=5)
    x = torch.randn(2, 9, cfg.dim, dtype=torch.float64)
    fused, _ = moe(x)
    from nmoe.kernels import expert_mlp

    moe.dispatcher = LocalDispatch(cfg.n_routed_experts, expert_mlp)
    composed, _ = moe(x)
    torch.testing.assert_close(composed, fused, rtol=1e-12, atol=1e-12)


def test_fp8_experts_track_the_bf16_layer():
    cfg = moe_config(n_routed_experts=4, dim=128, moe_inter_dim=64, top_k=2, n_shared_experts=0)
    fp8 = moe_config(n_routed_experts=4, dim=128, moe_inter_dim=64, top_k=2, n_shared_experts=0, expert_precision="fp8")
    ref, low = build_moe(cfg, seed=6, dtype=torch.float32), build_moe(fp8, seed=6, dtype=torch.float32)
    x = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(0))
    y_ref, y_low = ref(x)[0], low(x)[0]
    rel = ((y_low - y_ref).norm() / y_ref.norm()).item()
    assert 1e-4 < rel < 0.1, rel  # quantised (not the bf16 path), yet close: E4M3 keeps ~2 significant digits


def test_fp8_fused_experts_equal_dispatch_fp8_mlp_combine_forward():
    """LocalDispatch runs moe_experts_fp8: the same forward as dispatch -> expert_mlp_fp8 -> combine, and its
    gradients are that composition's to fp8 precision (dy is quantised before the routing weight is applied)."""
    cfg = moe_config(n_routed_experts=4, dim=128, moe_inter_dim=64, top_k=2, n_shared_experts=0, expert_precision="fp8")
    moe = build_moe(cfg, seed=7, dtype=torch.float32)
    x = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
    fused, _ = moe(x)
    (g_fused,) = torch.autograd.grad(fused.square().sum(), x)
    moe.dispatcher = LocalDispatch(cfg.n_routed_experts, expert_mlp_of(cfg))
    composed, _ = moe(x)
    (g_composed,) = torch.autograd.grad(composed.square().sum(), x)
    torch.testing.assert_close(fused, composed, rtol=1e-6, atol=1e-6)
    assert ((g_fused - g_composed).norm() / g_composed.norm()).item() < 0.05


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_routed_experts_read_the_master_weights_as_their_gemms_need(precision):
    """Under bf16 autocast the fused op gets the float32 parameters themselves (fp8 quantises them straight, bf16
    casts them inside) and their gradients arrive in float32; bf16's forward equals the op on weights cast outside
    and its weight gradients equal those within bf16 rounding (they skip the bf16 round trip)."""
    cfg = moe_config(n_routed_experts=4, dim=128, moe_inter_dim=64, top_k=2, n_shared_experts=0,
                     expert_precision=precision)  # fmt: skip
    moe = build_moe(cfg, seed=3, dtype=torch.float32)
    seen = []
    op = moe.dispatcher.fused

    def spy(x, ids, weights, w_up, w_down):
        seen.append((x.dtype, w_up, w_down))
        return op(x, ids, weights, w_up, w_down)

    moe.dispatcher.fused = spy
    x = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    assert seen[0][0] == torch.bfloat16 and seen[0][1] is moe.w_up and seen[0][2] is moe.w_down
    y.float().square().sum().backward()
    assert moe.w_up.grad.dtype == moe.w_down.grad.dtype == torch.float32
    assert moe.w_up.grad.abs().sum() > 0 and moe.w_down.grad.abs().sum() > 0
    if precision == "bf16":
        flat = x.reshape(-1, 128).to(torch.bfloat16)
        r = route(flat, moe.gate, moe.expert_bias, cfg)
        want = nk.moe_experts(flat, r.topk_ids, r.weights, moe.w_up.to(torch.bfloat16), moe.w_down.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = moe._routed(flat, r.topk_ids, r.weights)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        cast = [w.detach().to(torch.bfloat16).requires_grad_() for w in (moe.w_up, moe.w_down)]
        masters = [w.detach().clone().requires_grad_() for w in (moe.w_up, moe.w_down)]
        ids, weights, dy = r.topk_ids.detach(), r.weights.detach(), torch.randn(want.shape).bfloat16()
        nk.moe_experts(flat.detach(), ids, weights, *cast).backward(dy)
        nk.moe_experts(flat.detach(), ids, weights, *masters).backward(dy)
        for c, m in zip(cast, masters):
            assert m.grad.dtype == torch.float32
            torch.testing.assert_close(m.grad.bfloat16(), c.grad, rtol=1e-2, atol=1e-3)


def test_fp8_recipe_keys_reach_the_expert_mlp_and_fast_accumulation_needs_rowwise():
    cfg = moe_config(expert_precision="fp8", fp8_wgrad=False, fp8_fast_accum=False)
    assert expert_mlp_of(cfg).keywords == dict(scaling="rowwise", wgrad_fp8=False, fast_accum=False)
    assert fused_experts_of(cfg).keywords == expert_mlp_of(cfg).keywords  # LocalDispatch's op, same recipe
    assert build_moe(cfg, seed=0, dtype=torch.float32).dispatcher.fused.func is nk.moe_experts_fp8
    assert build_moe(moe_config(), seed=0, dtype=torch.float32).dispatcher.fused is nk.moe_experts
    assert expert_mlp_of(moe_config(expert_precision="fp8")).keywords == dict(  # the measured defaults
        scaling="rowwise", wgrad_fp8=True, fast_accum=True
    )
    with pytest.raises(ValueError, match="fp8_fast_accum = true needs model.fp8_scaling = 'rowwise'"):
        moe_config(expert_precision="fp8", fp8_scaling="blockwise")
    blockwise = moe_config(expert_precision="fp8", fp8_scaling="blockwise", fp8_fast_accum=False)
    assert expert_mlp_of(blockwise).keywords["scaling"] == "blockwise"
    moe_config(fp8_scaling="blockwise")  # the fp8 keys only matter when the experts run in fp8
