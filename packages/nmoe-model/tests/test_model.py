"""Transformer: shapes build on meta, init, forward dtypes, diagnostics, bias control, param kinds, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmoe.model import PARAM_KINDS, ModelConfig, Transformer, model_summary


def small_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64,
        dim=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=32,
        attn_local="swa",
        attn_global_every=2,
        attn_local_window=4,
        n_dense_layers=1,
        inter_dim=48,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_inter_dim=16,
        top_k=2,
    )
    base.update(overrides)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(seed)
    return model.to(dtype)


def test_shipped_configs_build_on_meta_with_formula_param_counts(config_name, shapes):
    cfg = shapes[config_name]
    with torch.device("meta"):
        model = Transformer(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == model_summary(cfg, 1024).total_params
    kinds = model.param_kinds()
    routed = sum(p.numel() for n, p in model.named_parameters() if kinds[n] == "expert")
    assert routed == model_summary(cfg, 1024).routed_expert_params


def test_tiny_param_count_by_hand():
    cfg = ModelConfig(
        vocab_size=4096,
        dim=128,
        n_layers=4,
        n_heads=4,
        attn="sdpa",
        attn_local="swa",
        attn_global_every=2,
        attn_local_window=128,
        n_dense_layers=1,
        inter_dim=512,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_inter_dim=128,
        top_k=2,
    )
    attn = 128 * 3 * 128 + 128 * 128
    dense_ffn = 3 * 128 * 512
    moe = 8 * 128 + 8 * 3 * 128 * 128 + 3 * 128 * 128
    expected = 2 * 4096 * 128 + 128 + 4 * (attn + 2 * 128) + dense_ffn + 3 * moe
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(cfg).parameters()) == expected


def test_moonlight_is_16b_total_3b_active(shapes):
    summary = model_summary(shapes["moonlight"], 4096)
    assert 15.9e9 < summary.total_params < 16.0e9
    assert 2.8e9 < summary.active_params < 3.0e9


def test_init_is_deterministic_per_seed_and_scales_output_projections():
    cfg = small_config(init_std=0.05, init_scheme="nmoe")  # nmoe: every std init_std, outputs / sqrt(2L)
    a, b, c = build(cfg, 1), build(cfg, 1), build(cfg, 2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)
    assert (a.blocks[0].attn_norm.weight == 1).all()
    assert a.blocks[1].ffn.w_up.std().item() == pytest.approx(0.05, rel=0.05)
    assert a.blocks[1].ffn.w_down.std().item() == pytest.approx(0.05 / 6**0.5, rel=0.05)


def test_meta_model_materialises_with_to_empty_and_init():
    cfg = small_config()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(3)
    ref = build(cfg, 3)
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(idx).logits, ref(idx).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_shapes_dtypes_and_backward(dtype):
    model = build(small_config(balance_loss_coef=0.01, z_loss_coef=0.001), dtype=dtype)
    idx = torch.randint(0, 64, (2, 16))
    out = model(idx)
    assert out.logits.shape == (2, 16, 64) and out.aux_loss.shape == ()
    assert out.aux_loss.item() > 0
    loss = F.cross_entropy(out.logits.view(-1, 64).to(dtype), idx.view(-1)) + out.aux_loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_bf16_autocast_forward_and_backward_on_cpu():
    model = build(small_config(attn="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))
    idx = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx)
    assert out.logits.dtype == torch.float32
    F.cross_entropy(out.logits.view(-1, 64), idx.view(-1)).backward()
    assert model.blocks[1].ffn.w_up.grad.dtype == torch.float32
    ref = model(idx).logits
    assert (out.logits - ref).abs().max() < 0.1


def test_dense_model_has_no_router_and_zero_aux():
    model = build(small_config(n_dense_layers=3, balance_loss_coef=1.0))
    out = model(torch.randint(0, 64, (1, 8)))
    assert out.aux_loss.item() == 0.0
    assert model.router_stats().layers == () and model.router_stats().as_scalars() == {}
    model.update_expert_bias()  # no-op


def test_router_stats_per_moe_layer_tags_and_reset():
    cfg = small_config(capacity_factor=0.5)
    model = build(cfg)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 16)))
        model(torch.randint(0, 64, (2, 16)))
    stats = model.router_stats()
    assert [s.layer for s in stats.layers] == [1, 2]
    for layer in stats.layers:
        assert layer.tokens == 64
        assert sum(layer.tokens_per_expert) == 64 * cfg.top_k
        assert 0 < layer.dropped_tokens < 64 * cfg.top_k
        assert 0 <= layer.collapse_frac <= 1 and layer.load_cv >= 0
        assert 0 < layer.entropy_mean <= torch.log(torch.tensor(8.0)).item() + 1e-6
        assert 1 / cfg.top_k - 1e-6 <= layer.max_gate_mean <= 1
        assert len(layer.bias) == 8
    scalars = stats.as_scalars()
    assert {
        "router/layer01/load_cv",
        "router/layer02/entropy_mean",
        "router/layer02/collapse_frac",
        "router/layer01/dropped_tokens",
        "router/layer01/max_gate_mean",
        "router/mean/load_cv",
    } <= set(scalars)
    assert all(isinstance(v, float) for v in scalars.values())
    empty = model.router_stats()
    assert all(layer.tokens == 0 and sum(layer.tokens_per_expert) == 0 for layer in empty.layers)


def test_collapse_fraction_counts_starved_experts():
    model = build(small_config(n_routed_experts=8, top_k=1, n_groups=1))
    moe = model.blocks[1].ffn
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([10.0, 10.0, 0, 0, 0, 0, 0, 0]))  # bias forces experts 0/1 to win
        model(torch.randint(0, 64, (2, 16)))
    layer = model.router_stats().layers[0]
    assert layer.collapse_frac == pytest.approx(6 / 8)
    assert sum(layer.tokens_per_expert[:2]) == 32


def test_update_expert_bias_uses_reduced_load_and_noop_at_rate_zero():
    model = build(small_config(bias_update_rate=0.1))
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 16)))
    seen = []

    def reduce_fn(load):
        seen.append(load.clone())
        load.zero_()
        load[3] = 100.0  # pretend the other ranks overloaded expert 3

    model.update_expert_bias(reduce_fn)
    assert len(seen) == 2
    bias = model.blocks[1].ffn.expert_bias
    assert bias.argmin().item() == 3 and bias[3] < 0
    frozen = build(small_config(bias_update_rate=0.0))
    with torch.no_grad():
        frozen(torch.randint(0, 64, (2, 16)))
    frozen.update_expert_bias()
    assert (frozen.blocks[1].ffn.expert_bias == 0).all()


def test_expert_bias_is_checkpointed_but_accumulators_are_not():
    keys = build(small_config()).state_dict().keys()
    assert "blocks.1.ffn.expert_bias" in keys
    assert not any("stat_" in k or "load_since" in k or "rope_" in k for k in keys)


def test_param_kinds_classify_every_parameter():
    model = build(
        small_config(attn="mla", q_lora_rank=8, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    )
    kinds = model.param_kinds()
    assert set(kinds.values()) <= set(PARAM_KINDS)
    assert kinds["tok_emb.weight"] == "embedding" and kinds["head.weight"] == "head"
    assert kinds["blocks.0.attn.kv_norm.weight"] == "norm" and kinds["blocks.1.ffn.gate"] == "router"
    assert kinds["blocks.1.ffn.w_up"] == "expert" and kinds["blocks.1.ffn.shared.w13.weight"] == "matrix"
    assert set(kinds) == {name for name, _ in model.named_parameters()}


def test_too_long_sequence_is_rejected():
    model = build(small_config())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = build(small_config(), dtype=torch.float64)
    idx = torch.randint(0, 64, (2, 16))
    eager = model(idx)
    model.router_stats()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(idx)
    torch.testing.assert_close(out.logits, eager.logits)
    torch.testing.assert_close(out.aux_loss, eager.aux_loss)
    out.logits.sum().backward()
    assert model.router_stats().layers[0].tokens == 32  # buffer updates survive compilation
