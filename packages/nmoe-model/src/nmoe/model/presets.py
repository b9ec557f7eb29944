"""Reference model shapes (the configs/ and speedrun/ TOMLs mirror these `[model]` sections)."""

from __future__ import annotations

from nmoe.model.config import ModelConfig

_MLA = dict(attn="mla", q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
_SPEEDRUN = dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, max_seq_len=2048, attn="sdpa")

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=4096, dim=128, n_layers=4, n_heads=4, max_seq_len=512, attn="sdpa", attn_local="swa",
        attn_global_every=2, attn_local_window=128, n_dense_layers=1, inter_dim=512, n_routed_experts=8,
        n_shared_experts=1, moe_inter_dim=128, top_k=2),
    "moonlet": ModelConfig(
        vocab_size=32768, dim=1024, n_layers=12, n_heads=16, max_seq_len=4096, **_MLA, n_dense_layers=1,
        inter_dim=4096, n_routed_experts=64, n_shared_experts=2, moe_inter_dim=704, top_k=6,
        score_func="sigmoid", route_scale=2.446),
    "moonlight": ModelConfig(
        vocab_size=163840, dim=2048, n_layers=27, n_heads=16, max_seq_len=8192, rope_theta=50000.0, **_MLA,
        n_dense_layers=1, inter_dim=11264, n_routed_experts=64, n_shared_experts=2, moe_inter_dim=1408, top_k=6,
        score_func="sigmoid", route_scale=2.446),
    "speedrun-dense": ModelConfig(**_SPEEDRUN, n_dense_layers=12, inter_dim=3072),
    # MoE speedrun shapes keep the dense baseline's active FFN width (3072) per token
    "speedrun-moe64": ModelConfig(
        **_SPEEDRUN, n_dense_layers=1, inter_dim=3072, n_routed_experts=64, n_shared_experts=2, moe_inter_dim=384,
        top_k=6, route_scale=2.5),
    "speedrun-moe256": ModelConfig(
        **_SPEEDRUN, n_dense_layers=1, inter_dim=3072, n_routed_experts=256, n_shared_experts=0, moe_inter_dim=384,
        top_k=8, n_groups=8, topk_groups=4, route_scale=2.5),
}


def preset(name: str) -> ModelConfig:
    """The named reference ModelConfig (see PRESETS)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
