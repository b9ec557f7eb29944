"""model_summary: FLOPs vs torch's flop counter, active params, attention key counts, memory estimates."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from nmoe.model import ModelConfig, Transformer, model_summary
from nmoe.model.summary import activation_bytes_per_token, attended_keys_mean

FLOP_CONFIGS = {
    "dense-sdpa": dict(attn="sdpa", n_dense_layers=2, inter_dim=256),
    "moe-sdpa-swa": dict(
        attn="sdpa",
        n_kv_heads=2,
        attn_local="swa",
        attn_global_every=2,
        attn_local_window=16,
        n_dense_layers=1,
        inter_dim=256,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_inter_dim=64,
        top_k=2,
        capacity_factor=1.25,
    ),
    "moe-mla": dict(
        attn="mla",
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_dense_layers=1,
        inter_dim=256,
        n_routed_experts=16,
        moe_inter_dim=32,
        top_k=4,
        n_groups=4,
        topk_groups=2,
    ),
}


def flop_config(**overrides) -> ModelConfig:
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=128, **overrides)


@pytest.mark.parametrize("name", sorted(FLOP_CONFIGS))
def test_training_flops_match_flop_counter(name):
    cfg = flop_config(**FLOP_CONFIGS[name])
    model = Transformer(cfg)
    model.init_weights(0)
    bsz, seq = 2, 64
    idx = torch.randint(0, cfg.vocab_size, (bsz, seq))
    with FlopCounterMode(display=False) as counter:
        out = model(idx)
        (F.cross_entropy(out.logits.view(-1, cfg.vocab_size), idx.view(-1)) + out.aux_loss).backward()
    summary = model_summary(cfg, seq, bsz)
    # the counter charges attention for the full S x S square (it cannot see the causal/window mask)
    expected = (summary.matmul_flops_per_token + summary.attention_flops_per_token_dense) * bsz * seq
    measured = counter.get_total_flops()
    assert measured == pytest.approx(expected, rel=0.05)


@settings(max_examples=40, deadline=None)
@given(seq=st.integers(1, 200), window=st.one_of(st.none(), st.integers(1, 300)))
def test_attended_keys_mean_counts_the_mask(seq, window):
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    allowed = (j <= i) & ((i - j < window) if window is not None else True)
    assert attended_keys_mean(seq, window) == pytest.approx(allowed.sum().item() / seq)


def test_causal_attention_flops_are_half_the_square_plus_diagonal():
    cfg = flop_config(attn="sdpa", n_dense_layers=2, inter_dim=256)
    s = model_summary(cfg, 128)
    assert s.attention_flops_per_token == pytest.approx(s.attention_flops_per_token_dense * (129 / 2) / 128)
    assert s.flops_per_token == s.matmul_flops_per_token + s.attention_flops_per_token


def test_active_params_scale_routed_experts_by_top_k(shapes):
    cfg = shapes["moonlet"]
    with torch.device("meta"):
        model = Transformer(cfg)
    kinds = model.param_kinds()
    routed = sum(p.numel() for n, p in model.named_parameters() if kinds[n] == "expert")
    rest = sum(p.numel() for n, p in model.named_parameters() if kinds[n] != "expert")
    s = model_summary(cfg, 2048)
    assert s.active_params == rest + round(routed * cfg.top_k / cfg.n_routed_experts)
    assert s.embedding_params == s.head_params == cfg.vocab_size * cfg.dim


def test_memory_estimates(shapes):
    cfg = shapes["moonlet"]
    fp32 = model_summary(cfg, 2048, batch_size=4)
    assert fp32.param_bytes == fp32.grad_bytes == 4 * fp32.total_params
    assert fp32.optimizer_bytes == 8 * fp32.total_params  # m, v; the fp32 params are the master copy
    bf16 = model_summary(cfg, 2048, batch_size=4, param_bytes=2, grad_bytes=2)
    assert bf16.optimizer_bytes == 12 * bf16.total_params  # m, v and an fp32 master copy
    assert model_summary(cfg, 2048, batch_size=8).activation_bytes == pytest.approx(2 * fp32.activation_bytes, rel=1e-6)
    assert fp32.total_memory_bytes == fp32.param_bytes + fp32.grad_bytes + fp32.optimizer_bytes + fp32.activation_bytes


def _saved_bytes(model: Transformer, cfg: ModelConfig, bsz: int, seq: int) -> int:
    """Bytes of distinct storages autograd saves in a bf16-autocast training step (the fused head + loss)."""
    weights = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, cfg.vocab_size, (bsz, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx, idx)
    return sum(storages.values())


@pytest.mark.parametrize("name", ["dense-sdpa", "moe-sdpa-swa"])
def test_activation_estimate_tracks_saved_tensors(name):
    # MLA is left out: on CPU its unequal q/v head widths send SDPA down the math path (S x S probabilities),
    # which the GPU kernels never save.
    cfg = flop_config(**FLOP_CONFIGS[name])
    model = Transformer(cfg)
    model.init_weights(0)
    seq = 64
    per_token = (_saved_bytes(model, cfg, 4, seq) - _saved_bytes(model, cfg, 2, seq)) / (2 * seq)  # weight casts cancel
    assert activation_bytes_per_token(cfg) == pytest.approx(per_token, rel=0.25)


@pytest.mark.parametrize(
    "layers,batch,checkpointing,peak_gib",
    # H100 peaks, bench/RESULTS.md: compiled 12 x 2048, without and with the MoE blocks re-run; the 6-layer study
    [(12, 12, "none", 45.4), (12, 12, "moe", 30.0), (6, 8, "none", 20.1)],
)
def test_memory_estimate_tracks_the_peaks_measured_on_the_gpu(shapes, layers, batch, checkpointing, peak_gib):
    """moonlet's estimate (fp32 params, grads and AdamW state, bf16 activations) against torch's peak allocation
    measured in training on an H100: within 10%, so that --dry-run can size a micro-batch."""
    cfg = dataclasses.replace(shapes["moonlet"], n_layers=layers)
    summary = model_summary(cfg, 2048, batch_size=batch, act_bytes=2, checkpointing=checkpointing)
    assert summary.total_memory_bytes / 2**30 == pytest.approx(peak_gib, rel=0.10)


def test_checkpointing_keeps_block_inputs_and_one_rerun_block(shapes):
    cfg = shapes["moonlet"]
    none, moe, every = (activation_bytes_per_token(cfg, 2, mode) for mode in ("none", "moe", "all"))
    assert every < moe < none
    assert every >= 4 * cfg.dim * cfg.n_layers  # every block's fp32 input stays
    with pytest.raises(ValueError, match="choose none, moe or all"):
        activation_bytes_per_token(cfg, 2, "some")


def test_table_lists_every_quantity(shapes):
    table = model_summary(shapes["moonlight"], 4096, batch_size=2).table()
    for label in (
        "total params",
        "active params / token",
        "embedding params",
        "train FLOPs / token",
        "memory: params",
        "memory: grads",
        "memory: optimizer",
        "memory: activations",
        "memory: total",
    ):
        assert label in table
    assert "15.960B" in table and "mla x27" in table
