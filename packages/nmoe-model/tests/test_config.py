"""ModelConfig follows the loader convention and rejects inconsistent shapes with actionable errors."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from nmoe.model import ModelConfig

REQUIRED = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, inter_dim=64)
ALLOWED_TYPES = {int, float, str, bool, int | None, float | None, str | None, bool | None}


def test_fields_follow_the_loader_convention():
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        assert hints[f.name] in ALLOWED_TYPES, f"{f.name}: {hints[f.name]}"
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"], f.name
        if "range" in f.metadata:
            lo, hi = f.metadata["range"]
            assert lo is None or hi is None or lo <= hi
        if "choices" in f.metadata:
            default = f.default
            assert default is dataclasses.MISSING or default in f.metadata["choices"], f.name
    required = {f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING}
    assert required == {"vocab_size", "dim", "n_layers", "n_heads"}


def test_issue_keys_are_all_config_fields():
    keys = """vocab_size dim n_layers n_heads n_kv_heads head_dim attn attn_local attn_global_every attn_local_window
    q_lora_rank kv_lora_rank qk_nope_head_dim qk_rope_head_dim v_head_dim rope_theta rope_factor original_seq_len
    beta_fast beta_slow mscale max_seq_len norm_eps inter_dim n_dense_layers n_routed_experts n_shared_experts
    moe_inter_dim top_k score_func route_norm route_scale n_groups topk_groups bias_update_rate balance_loss_coef
    z_loss_coef capacity_factor init_std""".split()
    assert set(keys) <= {f.name for f in dataclasses.fields(ModelConfig)}


def test_frozen():
    cfg = ModelConfig(**REQUIRED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 64


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (dict(top_k=8, n_routed_experts=4), ["top_k (8) > n_routed_experts (4)", "model.top_k"]),
        (dict(n_dense_layers=5), ["n_dense_layers (5) > n_layers (4)", "model.n_dense_layers"]),
        (dict(n_dense_layers=1, inter_dim=0), ["model.inter_dim"]),
        (dict(n_routed_experts=10, n_groups=4), ["n_groups (4)", "model.n_groups"]),
        (dict(n_groups=2, topk_groups=3), ["topk_groups (3) > n_groups (2)"]),
        (dict(n_routed_experts=8, n_groups=4, topk_groups=1, top_k=3), ["model.topk_groups", "model.top_k"]),
        (dict(dim=30, n_heads=4), ["n_heads (4)", "model.head_dim"]),
        (dict(n_kv_heads=3), ["n_kv_heads (3)", "model.n_kv_heads"]),
        (dict(attn="flash"), ["model.attn", "'mla', 'sdpa'"]),
        (dict(score_func="relu"), ["model.score_func"]),
        (dict(top_k=0), ["model.top_k = 0", "out of range; allowed range is [1, inf]"]),
        (dict(qk_rope_head_dim=5, attn="mla"), ["qk_rope_head_dim (5)"]),
    ],
)
def test_inconsistent_configs_name_the_keys(overrides, keys):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**REQUIRED, **overrides})
    for key in keys:
        assert key in str(err.value)


def test_dense_model_ignores_moe_consistency():
    cfg = ModelConfig(**REQUIRED, n_dense_layers=4, top_k=100, n_routed_experts=4)
    assert not cfg.has_moe and cfg.moe_layers == ()


def test_local_global_layer_pattern():
    cfg = ModelConfig(**REQUIRED | {"n_layers": 7}, attn_local="swa", attn_global_every=3, attn_local_window=16)
    assert [cfg.is_global_layer(i) for i in range(7)] == [False, False, True, False, False, True, True]
    assert cfg.layer_window(0) == 16 and cfg.layer_window(2) is None
    everywhere = ModelConfig(**REQUIRED, attn_global_every=3)  # attn_local = 'none': all global
    assert all(everywhere.is_global_layer(i) for i in range(4))


def test_shipped_shapes_cover_dense_moe64_and_moe256(shapes):
    assert {
        "tiny",
        "moonlet",
        "moonlight",
        "speedrun/small_dense_sdpa",
        "speedrun/small_moe",
        "speedrun/small_moe_ultra",
        "speedrun/super",
    } <= set(shapes)
    dense = shapes["speedrun/small_dense_sdpa"]
    assert dense.n_dense_layers == dense.n_layers and not dense.has_moe
    assert shapes["speedrun/small_moe"].n_routed_experts == 64
    assert shapes["speedrun/small_moe_ultra"].top_k == 8 and shapes["speedrun/small_moe_ultra"].n_routed_experts == 256
