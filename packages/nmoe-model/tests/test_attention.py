"""Attention: MLA vs its absorbed latent form, SWA vs masked full attention, GQA vs per-head loop, RoPE, causality."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.model import ModelConfig, Transformer
from nmoe.model.attention import GQAttention, MLAttention, sliding_window_block_mask
from nmoe.model.layers import apply_rope, rope_frequencies, rope_tables

SEQ = 24


def attn_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=50,
        dim=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=64,
        n_dense_layers=2,
        inter_dim=48,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return module


def masked_softmax_attention(scores: torch.Tensor, window: int | None) -> torch.Tensor:
    """Softmax over keys of scores[..., S, S] with the causal (optionally windowed) mask applied explicitly."""
    seq = scores.shape[-1]
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mla_absorbed(attn: MLAttention, x: torch.Tensor, cos, sin, window) -> torch.Tensor:
    """MLA computed in the latent space: W_UK absorbed into the query, W_UV applied after attending the latent."""
    bsz, seq, _ = x.shape
    h, nope, rope, vdim, r_kv = attn.n_heads, attn.nope, attn.rope, attn.v_dim, attn.kv_lora_rank
    a = x @ attn.wqkv_a.weight.T
    q_part, c_kv, k_rope = a.split(attn.split, dim=-1)
    q = (rms(q_part, attn.q_norm.weight, attn.q_norm.eps) @ attn.wq_b.weight.T) if attn.q_lora_rank else q_part
    q = q.view(bsz, seq, h, nope + rope)
    q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin)
    k_rope = apply_rope(k_rope.view(bsz, seq, 1, rope), cos, sin)[:, :, 0]
    latent = rms(c_kv, attn.kv_norm.weight, attn.kv_norm.eps)  # [B,S,r_kv]
    w_kv = attn.wkv_b.weight.view(h, nope + vdim, r_kv)
    w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]
    q_latent = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)
    scores = torch.einsum("bihr,bjr->bhij", q_latent, latent) + torch.einsum("bihd,bjd->bhij", q_rope, k_rope)
    probs = masked_softmax_attention(scores * attn.scale, window)
    out_latent = torch.einsum("bhij,bjr->bihr", probs, latent)
    out = torch.einsum("bihr,hvr->bihv", out_latent, w_uv)
    return out.reshape(bsz, seq, h * vdim) @ attn.wo.weight.T


def gqa_per_head(attn: GQAttention, x: torch.Tensor, cos, sin, window) -> torch.Tensor:
    """GQA as an explicit loop over query heads, each reading its group's key/value head."""
    bsz, seq, _ = x.shape
    hd, h, kv = attn.head_dim, attn.n_heads, attn.n_kv
    w = attn.wqkv.weight
    q = (x @ w[: h * hd].T).view(bsz, seq, h, hd)
    k = (x @ w[h * hd : (h + kv) * hd].T).view(bsz, seq, kv, hd)
    v = (x @ w[(h + kv) * hd :].T).view(bsz, seq, kv, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    heads = []
    for head in range(h):
        g = head // (h // kv)
        scores = q[:, :, head] @ k[:, :, g].transpose(1, 2) * attn.scale
        heads.append(masked_softmax_attention(scores, window) @ v[:, :, g])
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


def tables(cfg: ModelConfig, rot_dim: int):
    cos, sin = rope_tables(rot_dim, cfg)
    return cos[:SEQ].double(), sin[:SEQ].double()


@pytest.mark.parametrize("q_lora_rank", [0, 10])
@pytest.mark.parametrize("window", [None, 7])
def test_mla_matches_absorbed_latent_computation(q_lora_rank, window):
    cfg = attn_config(attn="mla", q_lora_rank=q_lora_rank, rope_factor=4.0, original_seq_len=8)
    attn = randomize(MLAttention(cfg, window), seed=1)
    x = torch.randn(2, SEQ, cfg.dim, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(cfg, cfg.qk_rope_head_dim)
    out = attn(x, cos, sin, None)
    ref = mla_absorbed(attn, x, cos, sin, window)
    torch.testing.assert_close(out, ref)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref)
    if window is not None:  # flex attention (no autograd on CPU) gives the same forward
        with torch.no_grad():
            flex_out = attn(x.detach(), cos, sin, sliding_window_block_mask(SEQ, window, x.device))
        torch.testing.assert_close(flex_out, ref.detach())


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("window", [None, 1, 5, 100])
def test_gqa_and_swa_match_explicit_masked_attention(n_kv_heads, window):
    cfg = attn_config(attn="sdpa", n_kv_heads=n_kv_heads)
    attn = randomize(GQAttention(cfg, window), seed=2)
    x = torch.randn(2, SEQ, cfg.dim, dtype=torch.float64, requires_grad=True)
    cos, sin = tables(cfg, cfg.sdpa_head_dim)
    ref = gqa_per_head(attn, x, cos, sin, window)
    out = attn(x, cos, sin, None)  # autograd path: sdpa (global) or dense-window fallback (local)
    torch.testing.assert_close(out, ref)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref)
    if window is not None:
        with torch.no_grad():
            flex_out = attn(x.detach(), cos, sin, sliding_window_block_mask(SEQ, window, x.device))
        torch.testing.assert_close(flex_out, ref.detach())


def test_window_covering_sequence_equals_global_attention():
    cfg = attn_config(attn="sdpa")
    local = randomize(GQAttention(cfg, window=SEQ), seed=3)
    glob = GQAttention(cfg, window=None).double()
    glob.load_state_dict(local.state_dict())
    x = torch.randn(1, SEQ, cfg.dim, dtype=torch.float64)
    cos, sin = tables(cfg, cfg.sdpa_head_dim)
    with torch.no_grad():
        torch.testing.assert_close(
            local(x, cos, sin, sliding_window_block_mask(SEQ, SEQ, x.device)), glob(x, cos, sin, None)
        )


def test_rope_is_a_rotation_by_position_times_frequency():
    cfg = attn_config(rope_theta=500.0)
    cos, sin = tables(cfg, 8)
    x = torch.randn(1, SEQ, 2, 8, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    freqs = rope_frequencies(8, cfg)
    pairs = torch.complex(x[..., :4], x[..., 4:])
    angle = torch.arange(SEQ, dtype=torch.float64)[:, None] * freqs
    rotated = pairs * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    torch.testing.assert_close(out, torch.cat((rotated.real, rotated.imag), dim=-1))
    # relative property: <rope(q,i), rope(k,j)> depends only on i - j
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    qs = apply_rope(q.expand(1, SEQ, 1, 8), cos, sin)[0, :, 0]
    ks = apply_rope(k.expand(1, SEQ, 1, 8), cos, sin)[0, :, 0]
    assert torch.allclose(qs[5] @ ks[2], qs[15] @ ks[12])


def test_yarn_keeps_fast_dims_and_interpolates_slow_dims():
    plain = rope_frequencies(64, attn_config())
    yarn_cfg = attn_config(rope_factor=8.0, original_seq_len=4096, max_seq_len=64)
    yarn = rope_frequencies(64, yarn_cfg)
    torch.testing.assert_close(yarn[:4], plain[:4])  # high-frequency dims untouched
    torch.testing.assert_close(yarn[-4:], plain[-4:] / 8.0)  # low-frequency dims divided by the factor
    assert yarn_cfg.attn_mscale == pytest.approx(0.1 * math.log(8.0) + 1.0)


CAUSAL_CONFIGS = {
    "sdpa": dict(attn="sdpa", n_kv_heads=2),
    "sdpa+swa": dict(attn="sdpa", attn_local="swa", attn_global_every=2, attn_local_window=4),
    "mla": dict(attn="mla", q_lora_rank=8),
    "mla+swa": dict(attn="mla", attn_local="swa", attn_global_every=3, attn_local_window=3, n_layers=3),
}


def causal_model(kind: str) -> Transformer:
    overrides = dict(n_dense_layers=1, n_routed_experts=4, moe_inter_dim=8, top_k=2, n_shared_experts=1)
    overrides.update(CAUSAL_CONFIGS[kind])
    model = Transformer(attn_config(**overrides)).double()
    model.init_weights(seed=0)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init make leaks visible
            p.mul_(5.0) if p.dim() > 1 else p
    return model


MODELS = {kind: causal_model(kind) for kind in CAUSAL_CONFIGS}


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(sorted(CAUSAL_CONFIGS)), cut=st.integers(1, SEQ - 1), grad=st.booleans(), data=st.data())
def test_changing_future_tokens_never_changes_earlier_logits(kind, cut, grad, data):
    model = MODELS[kind]
    tokens = data.draw(st.lists(st.integers(0, 49), min_size=SEQ, max_size=SEQ))
    future = data.draw(st.lists(st.integers(0, 49), min_size=SEQ - cut, max_size=SEQ - cut))
    a = torch.tensor([tokens])
    b = torch.tensor([tokens[:cut] + future])
    with torch.set_grad_enabled(grad):  # grad: sdpa / dense-window path; no grad: flex attention on local layers
        la, lb = model(a).logits, model(b).logits
    torch.testing.assert_close(la[:, :cut], lb[:, :cut], rtol=1e-12, atol=1e-12)
    if tokens[cut:] != future:
        assert not torch.allclose(la[:, cut:], lb[:, cut:])


@pytest.mark.parametrize("seq", [5, 128, 200])
def test_flex_pads_to_whole_blocks_and_matches_the_dense_window(seq):
    # compiled flex cannot lower a sequence shorter than one block on the GPU: the mask covers whole blocks and
    # attend pads q, k, v to it; the padded keys are never visible to a real query
    cfg = attn_config(attn="sdpa", n_kv_heads=2)
    attn = randomize(GQAttention(cfg, window=9), seed=4)
    x = torch.randn(1, seq, cfg.dim, dtype=torch.float64)
    rot = rope_tables(cfg.sdpa_head_dim, dataclasses.replace(cfg, max_seq_len=max(seq, cfg.max_seq_len)))
    cos, sin = rot[0][:seq].double(), rot[1][:seq].double()
    mask = sliding_window_block_mask(seq, 9, x.device)
    assert mask.seq_lengths == (-(-seq // 128) * 128,) * 2
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, mask), gqa_per_head(attn, x, cos, sin, 9))
