"""Transformer.init_weights under the model.init_* keys: each scheme and knob draws the stds it claims (empirical
std per tensor, per half of fused gate|up projections), the nmoe default is the pre-knob init bit for bit,
draws are deterministic per seed and independent of the expert-parallel layout."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmoe.model import ModelConfig, Transformer, init_rules

# big enough that every tensor (or half) has >= 2048 elements: empirical std within ~1.6% (1 sd)
SHAPE = dict(
    vocab_size=256,
    dim=128,
    n_layers=4,
    n_heads=4,
    attn="mla",
    q_lora_rank=0,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    max_seq_len=16,
    n_dense_layers=1,
    inter_dim=64,
    n_routed_experts=16,
    n_shared_experts=1,
    moe_inter_dim=32,
    top_k=2,
)
STD = 0.02
TRUNC3_STD = math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2)))


def config(**init) -> ModelConfig:
    return ModelConfig(**SHAPE, init_std=STD, **init)


def built(cfg: ModelConfig, seed: int = 0, ep_rank: int = 0, ep_size: int = 1) -> Transformer:
    model = Transformer(cfg, ep_rank, ep_size)
    model.init_weights(seed)
    return model


def layer_of(name: str) -> int:
    return int(name.split(".")[1])


def depth(rule: str, layer: int, n_layers: int) -> float:
    return {"sqrt_2L": (2 * n_layers) ** -0.5, "depth": (2 * (layer + 1)) ** -0.5, "none": 1.0, "zero": 0.0}[rule]


def expected(cfg: ModelConfig, name: str, knobs: dict) -> tuple[float, float, bool]:
    """(std of the tensor or its gate half, std of its up half, truncated) written out from the key docs."""
    d = cfg.dim
    if name == "tok_emb.weight":
        s = knobs["embed_std"]
        return s, s, False
    if name == "head.weight":
        s = {"inv_sqrt_dim": d**-0.5, "zero": 0.0}.get(knobs["head"], STD)
        return s, s, knobs["head"] == "inv_sqrt_dim"
    layer = layer_of(name)
    out = depth(knobs["out_proj"], layer, cfg.n_layers)
    up = out if knobs["out_proj"] == "depth" else 1.0
    fan_in = knobs["experts"] == "fan_in"
    if name.endswith("ffn.gate"):
        s = knobs["router_std"] * depth(knobs["router"], layer, cfg.n_layers)
        return s, s, False
    if name.endswith("ffn.w_down"):
        s = (cfg.moe_inter_dim**-0.5 if fan_in else knobs["expert_std"]) * out
        return s, s, False
    if name.endswith("ffn.w_up"):
        s = d**-0.5 if fan_in else knobs["expert_std"]
        return s, s * up, False
    if name.endswith(("wo.weight", "w2.weight")):
        return STD * out, STD * out, False
    if name.endswith("w13.weight"):
        return STD, STD * up, False
    return STD, STD, False


NMOE = dict(embed_std=STD, head="init_std", out_proj="sqrt_2L", router="none", router_std=STD, experts="matrix")
NMOE["expert_std"] = STD
TORCHTITAN = dict(NMOE, embed_std=1.0, head="inv_sqrt_dim", out_proj="depth", router="depth")
WIDE = dict(TORCHTITAN, experts="fan_in")  # and matrices at 0.03 unless init_std is set (config() sets it)
SCHEME_KNOBS = {"nmoe": NMOE, "torchtitan": TORCHTITAN, "wide": WIDE}


def halves(name: str, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate half, up half) of fused gate|up projections; the whole tensor twice otherwise."""
    if name.endswith("w13.weight"):
        return p.chunk(2, dim=0)
    if name.endswith("w_up"):
        return p.chunk(2, dim=-1)
    return p, p


def assert_stds(model: Transformer, knobs: dict) -> None:
    kinds = model.param_kinds()
    for name, p in model.named_parameters():
        if kinds[name] == "norm":
            assert (p == 1).all(), name
            continue
        gate_std, up_std, truncated = expected(model.cfg, name, knobs)
        for part, want in zip(halves(name, p.detach()), (gate_std, up_std)):
            if truncated:
                assert part.abs().max() <= 3 * want * (1 + 1e-6), name
                want *= TRUNC3_STD
            got = part.double().std().item()
            tol = 6 / math.sqrt(2 * part.numel())  # 6 standard errors of a sample std
            assert got == pytest.approx(want, rel=tol), f"{name}: std {got:.5g}, expected {want:.5g}"


@pytest.mark.parametrize("scheme", SCHEME_KNOBS)
def test_each_scheme_draws_the_stds_it_claims(scheme):
    assert_stds(built(config(init_scheme=scheme)), SCHEME_KNOBS[scheme])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scheme=st.sampled_from(list(SCHEME_KNOBS)),
    embed_std=st.sampled_from([None, 0.5, 1.0]),
    head=st.sampled_from(["scheme", "init_std", "inv_sqrt_dim", "zero"]),
    out_proj=st.sampled_from(["scheme", "sqrt_2L", "depth", "none", "zero"]),
    router=st.sampled_from(["scheme", "sqrt_2L", "depth", "none"]),
    router_std=st.sampled_from([None, 0.006]),
    experts=st.sampled_from(["scheme", "matrix", "fan_in"]),
    expert_std=st.sampled_from([None, 0.01]),
)
def test_every_knob_combination_draws_the_stds_it_claims(
    scheme, embed_std, head, out_proj, router, router_std, experts, expert_std
):
    if experts == "fan_in" or (experts == "scheme" and scheme == "wide"):
        expert_std = None
    cfg = config(
        init_scheme=scheme,
        init_embed_std=embed_std,
        init_head=head,
        init_out_proj=out_proj,
        init_router=router,
        init_router_std=router_std,
        init_experts=experts,
        init_expert_std=expert_std,
    )
    base = dict(SCHEME_KNOBS[scheme])
    chosen = dict(head=head, out_proj=out_proj, router=router, experts=experts)
    base.update({k: v for k, v in chosen.items() if v != "scheme"})
    base.update({k: v for k, v in dict(embed_std=embed_std, router_std=router_std, expert_std=expert_std).items() if v})
    assert_stds(built(cfg), base)


def legacy_init(model: Transformer, seed: int) -> dict[str, torch.Tensor]:
    """The init before the init_* keys existed, written out: normal(0, init_std), output projections
    / sqrt(2L), norms 1; generators seeded by (seed, name) and (seed, name[global expert])."""
    std = 0.02
    out_std = std / (2 * model.cfg.n_layers) ** 0.5

    def gen(key: str) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        return g

    kinds, out = model.param_kinds(), {}
    for name, p in model.named_parameters():
        t = torch.empty_like(p)
        scale = out_std if name.endswith(("wo.weight", "w2.weight", "w_down")) else std
        if kinds[name] == "norm":
            t.fill_(1.0)
        elif kinds[name] == "expert":
            for i in range(p.shape[0]):
                t[i].normal_(0.0, scale, generator=gen(f"{name}[{i}]"))
        else:
            t.normal_(0.0, scale, generator=gen(name))
        out[name] = t
    return out


def test_default_scheme_is_wide_and_nmoe_is_the_legacy_init_bit_for_bit():
    assert ModelConfig(**SHAPE).init_scheme == "wide"  # measured to learn fastest under AdamW (bench/RESULTS.md)
    model = built(ModelConfig(**SHAPE, init_scheme="nmoe"), seed=5)
    legacy = legacy_init(model, 5)
    for name, p in model.named_parameters():
        assert torch.equal(p, legacy[name]), name


def test_wide_is_torchtitan_with_wider_matrices_and_fan_in_experts_bit_for_bit():
    """The variant bench/learning.py measured (std03-fanin) is the scheme, draw for draw."""
    wide = built(ModelConfig(**SHAPE, init_scheme="wide"), seed=4)
    measured = built(ModelConfig(**SHAPE, init_scheme="torchtitan", init_std=0.03, init_experts="fan_in"), seed=4)
    for (name, a), b in zip(wide.named_parameters(), measured.parameters()):
        assert torch.equal(a, b), name
    assert [init_rules(ModelConfig(**SHAPE, init_scheme=s)).matrix_std for s in ("nmoe", "torchtitan", "wide")] == [
        0.02,
        0.02,
        0.03,
    ]


def test_scheme_only_sets_defaults():
    overridden = config(
        init_scheme="torchtitan", init_embed_std=STD, init_head="init_std", init_out_proj="sqrt_2L", init_router="none"
    )
    a, b = built(config(init_scheme="nmoe"), 3), built(overridden, 3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("scheme", list(SCHEME_KNOBS))
def test_deterministic_per_seed(scheme):
    cfg = config(init_scheme=scheme)
    a, b, c = built(cfg, 1), built(cfg, 1), built(cfg, 2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert (pa == 1).all() or not torch.equal(pa, pc), name


@pytest.mark.parametrize("scheme", list(SCHEME_KNOBS))
def test_expert_parallel_layout_does_not_change_the_init(scheme):
    cfg = config(init_scheme=scheme, init_experts="fan_in")
    whole = dict(built(cfg, 7).named_parameters())
    ranks = [dict(built(cfg, 7, rank, 2).named_parameters()) for rank in range(2)]
    kinds = built(cfg, 7).param_kinds()
    for name, p in whole.items():
        if kinds[name] == "expert":
            assert torch.equal(p, torch.cat([r[name] for r in ranks])), name
        else:
            assert all(torch.equal(p, r[name]) for r in ranks), name


def test_fan_in_with_an_expert_std_is_refused():
    with pytest.raises(ValueError, match="model.init_expert_std.*model.init_experts = 'fan_in'"):
        config(init_experts="fan_in", init_expert_std=0.01)


def test_unknown_rule_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match="model.init_out_proj = 'deep'.*'sqrt_2L', 'depth', 'none'"):
        config(init_out_proj="deep")
