"""The fused head + loss equals cross-entropy over full logits; the whole model compiles into one graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmoe.model import ModelConfig, Transformer


def config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32, attn_local="swa",
                attn_global_every=2, attn_local_window=4, n_dense_layers=1, inter_dim=48, n_routed_experts=4,
                n_shared_experts=1, moe_inter_dim=16, top_k=2)  # fmt: skip
    return ModelConfig(**{**base, **overrides})


def model_of(cfg: ModelConfig, dtype=torch.float32) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(3)
    return model.to(dtype)


@pytest.mark.parametrize("attn", ["sdpa", "mla"])
def test_fused_loss_equals_cross_entropy_of_the_logits(attn):
    extra = (
        dict(attn="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8) if attn == "mla" else {}
    )
    model = model_of(config(**extra), torch.float64)
    gen = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, 64, (2, 16), generator=gen), torch.randint(0, 64, (2, 16), generator=gen)
    fused = model(idx, tgt)
    assert fused.logits is None
    (g_fused,) = torch.autograd.grad(fused.loss, [model.head.weight])
    logits = model.head(model.hidden(idx)[0])  # float64 (forward() returns float32 logits)
    ref = F.cross_entropy(logits.view(-1, 64), tgt.view(-1))
    (g_ref,) = torch.autograd.grad(ref, [model.head.weight])
    torch.testing.assert_close(fused.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_the_model_compiles_without_graph_breaks(precision):
    """precision: model.expert_precision (fp8: the moe_experts_fp8 op, its CPU reference inside)."""
    torch._dynamo.reset()
    model = model_of(config(capacity_factor=1.0, expert_precision=precision))  # the dropped-pair path too
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    idx, tgt = torch.randint(0, 64, (2, 16), generator=gen), torch.randint(0, 64, (2, 16), generator=gen)
    out = compiled(idx, tgt)
    grads = torch.autograd.grad(out.loss + out.aux_loss, list(model.parameters()), allow_unused=True)
    eager = model(idx, tgt)
    eager_grads = torch.autograd.grad(eager.loss + eager.aux_loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    logits = torch.compile(model, fullgraph=True, backend="aot_eager")(idx).logits  # the plain forward too
    torch.testing.assert_close(logits, model(idx).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["moe", "all"])
def test_activation_checkpointing_changes_nothing_but_memory(mode):
    cfg = config()
    gen = torch.Generator().manual_seed(2)
    idx, tgt = torch.randint(0, 64, (2, 16), generator=gen), torch.randint(0, 64, (2, 16), generator=gen)
    results = []
    for setting in ("none", mode):
        model = model_of(cfg, torch.float64)
        model.set_activation_checkpointing(setting)
        out = model(idx, tgt)
        grads = torch.autograd.grad(out.loss + out.aux_loss, list(model.parameters()), allow_unused=True)
        stats = torch.stack([m.take_stats() for m in model.moe_layers])  # router load counted once, not twice
        results.append((out.loss.detach(), grads, stats))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(stats_a, stats_b)
    for a, b in zip(grads_a, grads_b):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("mode", ["moe", "all"])
def test_activation_checkpointing_compiles_as_one_graph(mode):
    """Under torch.compile(fullgraph=True) the checkpointed model gives the eager loss, gradients and router
    statistics (counted once)."""
    torch._dynamo.reset()
    cfg = config()
    gen = torch.Generator().manual_seed(3)
    idx, tgt = torch.randint(0, 64, (2, 16), generator=gen), torch.randint(0, 64, (2, 16), generator=gen)
    results = []
    for setting, compiled in (("none", False), (mode, True)):
        model = model_of(cfg)
        model.set_activation_checkpointing(setting)
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        out = run(idx, tgt)
        grads = torch.autograd.grad(out.loss + out.aux_loss, list(model.parameters()), allow_unused=True)
        stats = torch.stack([m.take_stats() for m in model.moe_layers])
        results.append((out.loss.detach(), grads, stats))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    assert stats_a[:, :-1].min() >= 0 and stats_a.sum() > 0  # training mode: the statistics were counted
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_b, stats_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
