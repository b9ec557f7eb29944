"""Cached decoding (Transformer.decode + KVCache) against the full forward."""

from __future__ import annotations

import pytest
import torch

from nmoe.model import ModelConfig, Transformer

# the shape of configs/tiny.toml, shrunk: 4 layers, local/global alternation, 1 dense + MoE blocks
TINY = dict(
    vocab_size=96,
    dim=32,
    n_layers=4,
    n_heads=4,
    max_seq_len=64,
    inter_dim=64,
    n_dense_layers=1,
    n_routed_experts=8,
    n_shared_experts=1,
    moe_inter_dim=16,
    top_k=2,
)
CASES = {
    "sdpa+swa": dict(attn="sdpa", n_kv_heads=2, head_dim=8, attn_local="swa", attn_global_every=2, attn_local_window=5),
    "mla": dict(attn="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    "mla+q_lora+swa": dict(
        attn="mla",
        q_lora_rank=12,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        attn_local="swa",
        attn_global_every=2,
        attn_local_window=6,
    ),
}


def build(kind: str, seed: int = 0) -> Transformer:
    model = Transformer(ModelConfig(**TINY, **CASES[kind]))
    model.init_weights(seed)
    # larger weights than the init's 0.02 so that the logits separate and argmax is well defined
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model.eval()


@pytest.mark.parametrize("kind", list(CASES))
def test_greedy_with_cache_equals_argmax_of_full_forward(kind):
    model = build(kind)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 96, (2, 7), generator=gen)
    cache = model.new_cache(batch_size=2, capacity=40)
    logits = model.decode(prompt, cache)
    with torch.no_grad():
        full = model(prompt).logits
    torch.testing.assert_close(logits, full, atol=2e-4, rtol=1e-4)
    seq = prompt
    for _ in range(20):  # past every window: the local layers' caches wrap
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        with torch.no_grad():
            full = model(torch.cat((seq, nxt), dim=1)).logits
        assert torch.equal(nxt[:, 0], full[:, -2].argmax(-1)), "cached greedy token differs from the full forward"
        seq = torch.cat((seq, nxt), dim=1)
        logits = model.decode(nxt, cache)
        torch.testing.assert_close(logits[:, 0], full[:, -1], atol=2e-4, rtol=1e-4)
    assert cache.position == seq.shape[1]


@pytest.mark.parametrize("kind", ["sdpa+swa", "mla+q_lora+swa"])
def test_chunked_prefill_equals_one_prefill_and_local_caches_hold_at_most_the_window(kind):
    model = build(kind, seed=3)
    idx = torch.randint(0, 96, (1, 23), generator=torch.Generator().manual_seed(2))
    whole = model.decode(idx, model.new_cache(1, 23))
    cache = model.new_cache(1, 23)
    parts = [model.decode(chunk, cache) for chunk in idx.split([9, 1, 8, 5], dim=1)]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=2e-4, rtol=1e-4)
    for i, kv in enumerate(cache.layers):
        window = model.cfg.layer_window(i)
        rows = kv.tensors[0].shape[1]
        if window is None:
            assert kv.length == 23 and rows == 23
        else:
            assert rows == window and torch.equal(kv.positions, torch.arange(23 - window, 23))


def test_mla_cache_stores_only_the_latent():
    model = build("mla")
    cache = model.new_cache(1, 10)
    model.decode(torch.zeros(1, 3, dtype=torch.long), cache)
    cfg = model.cfg
    (latent,) = cache.layers[0].tensors
    assert latent.shape == (1, 10, cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def test_cache_limits_are_enforced():
    model = build("mla")
    with pytest.raises(ValueError, match="max_seq_len"):
        model.new_cache(1, 65)
    cache = model.new_cache(1, 4)
    model.decode(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="capacity"):
        model.decode(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="sequences"):
        model.decode(torch.zeros(2, 1, dtype=torch.long), cache)
