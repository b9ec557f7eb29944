"""Attention: grouped-query (sdpa), DeepSeek multi-head latent attention (mla), sliding window (swa).

Global layers run causal `F.scaled_dot_product_attention`; local layers run the same projections
through flex attention with a sliding-window block mask. FlexAttention has no CPU backward, so on
CPU with autograd a dense windowed mask is used instead (CPU is the test path, not the fast path).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from nmoe.model.config import ModelConfig
from nmoe.model.kv_cache import LayerKV, decode_mask
from nmoe.model.layers import RMSNorm, apply_rope

_compiled_flex = None
FLEX_BLOCK = 128  # flex attention's default block size; block masks cover whole blocks


def _flex(q, k, v, block_mask: BlockMask, scale: float, enable_gqa: bool) -> torch.Tensor:
    """flex_attention, compiled once on accelerators (eager flex materialises the full score matrix).

    q, k, v are zero-padded at the end to the block mask's length (a multiple of FLEX_BLOCK) and the output cut
    back: compiled flex fails to lower sequences shorter than one block (torch 2.11, H100: 96 tokens fail, 200
    pass). Exact: causal masks never let a real query see a padded key.
    """
    seq, padded = q.shape[2], block_mask.seq_lengths[0]
    if padded != seq:
        q, k, v = (F.pad(t, (0, 0, 0, padded - seq)) for t in (q, k, v))
    return _flex_call(q, k, v, block_mask, scale, enable_gqa)[:, :, :seq]


def _flex_call(q, k, v, block_mask: BlockMask, scale: float, enable_gqa: bool) -> torch.Tensor:
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if q.device.type == "cpu":  # eager flex on CPU is the expected (unfused) path: silence its advice
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def sliding_window_block_mask(seq_len: int, window: int, device: torch.device) -> BlockMask:
    """Flex block mask for causal attention to the `window` most recent positions (self included), over seq_len
    rounded up to a multiple of FLEX_BLOCK (attend pads q, k, v to it)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    padded = -(-seq_len // FLEX_BLOCK) * FLEX_BLOCK
    return create_block_mask(mask_mod, None, None, padded, padded, device=device)


def sliding_window_dense_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean [S,S] mask, True where query i may attend key j (j <= i, i - j < window)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None, block_mask: BlockMask | None
) -> torch.Tensor:
    """Causal attention q[B,H,S,dk], k[B,Hk,S,dk], v[B,Hk,S,dv] -> [B,H,S,dv]; window=None is global.

    Local layers use flex attention with `block_mask`; block_mask=None selects the dense-mask fallback.
    """
    gqa = q.shape[1] != k.shape[1]
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if block_mask is None:
        mask = sliding_window_dense_mask(q.shape[2], window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return _flex(q, k, v, block_mask, scale, gqa)


class GQAttention(nn.Module):
    """Multi-head / grouped-query attention with one fused qkv projection and RoPE on full heads."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.sdpa_head_dim
        self.window = window
        self.scale = self.head_dim**-0.5 * cfg.attn_mscale**2
        self.wqkv = nn.Linear(cfg.dim, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_mask: BlockMask | None
    ) -> torch.Tensor:
        """x[B,S,dim], rope cos/sin[S,head_dim/2] -> [B,S,dim]."""
        bsz, seq, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        q = apply_rope(q.view(bsz, seq, self.n_heads, hd), cos, sin)
        k = apply_rope(k.view(bsz, seq, self.n_kv, hd), cos, sin)
        v = v.view(bsz, seq, self.n_kv, hd)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, self.window, block_mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, self.n_heads * hd))

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, kv: LayerKV
    ) -> torch.Tensor:
        """Cached inference: x[B,S,dim] at absolute `positions` [S] -> [B,S,dim]; appends roped k and v to kv."""
        bsz, seq, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        q = apply_rope(q.view(bsz, seq, self.n_heads, hd), cos, sin)
        k = apply_rope(k.view(bsz, seq, self.n_kv, hd), cos, sin)
        (k_all, v_all), key_pos = kv.extend((k, v.view(bsz, seq, self.n_kv, hd)), positions)
        mask = decode_mask(positions, key_pos, self.window)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k_all.transpose(1, 2),
            v_all.transpose(1, 2),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.n_heads != self.n_kv,
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, self.n_heads * hd))


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (training form: keys/values expanded from the latent).

    q = W_q x (or W_qb norm(W_qa x)); [c_kv | k_rope] = W_kva x; [k_nope | v] = W_kvb norm(c_kv);
    k = [k_nope | rope(k_rope) shared by all heads]; q = [q_nope | rope(q_rope)].
    The query-side down projection and W_kva read the same input, so they are one fused matrix.
    """

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope + self.rope
        self.window = window
        self.scale = self.qk_dim**-0.5 * cfg.attn_mscale**2
        q_out = self.q_lora_rank if self.q_lora_rank else self.n_heads * self.qk_dim
        self.split = [q_out, self.kv_lora_rank, self.rope]
        self.wqkv_a = nn.Linear(cfg.dim, sum(self.split), bias=False)
        if self.q_lora_rank:
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_mask: BlockMask | None
    ) -> torch.Tensor:
        """x[B,S,dim], rope cos/sin[S,qk_rope_head_dim/2] -> [B,S,dim]."""
        bsz, seq, _ = x.shape
        heads = self.n_heads
        q, c_kv, k_rope = self.wqkv_a(x).split(self.split, dim=-1)
        if self.q_lora_rank:
            q = self.wq_b(self.q_norm(q))
        q_nope, q_rope = q.view(bsz, seq, heads, self.qk_dim).split([self.nope, self.rope], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_rope, cos, sin)), dim=-1)
        k_rope = apply_rope(k_rope.view(bsz, seq, 1, self.rope), cos, sin)
        kv = self.wkv_b(self.kv_norm(c_kv)).view(bsz, seq, heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(bsz, seq, heads, self.rope).to(k_nope.dtype)), dim=-1)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, self.window, block_mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, heads * self.v_dim))

    def decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, kv: LayerKV
    ) -> torch.Tensor:
        """Cached inference: x[B,S,dim] at absolute `positions` [S] -> [B,S,dim].

        Caches only the latent [norm(c_kv) | rope(k_rope)] (kv_lora_rank + qk_rope_head_dim per token) and
        attends in latent space: W_kvb's key half is absorbed into the query and its value half applied
        after the softmax, so keys and values are never expanded per head.
        """
        bsz, seq, _ = x.shape
        heads = self.n_heads
        q, c_kv, k_rope = self.wqkv_a(x).split(self.split, dim=-1)
        if self.q_lora_rank:
            q = self.wq_b(self.q_norm(q))
        q_nope, q_rope = q.view(bsz, seq, heads, self.qk_dim).split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        c_kv = self.kv_norm(c_kv)
        k_rope = apply_rope(k_rope.view(bsz, seq, 1, self.rope), cos, sin).view(bsz, seq, self.rope)
        (latent,), key_pos = kv.extend((torch.cat((c_kv, k_rope.to(c_kv.dtype)), dim=-1),), positions)
        c_all, k_rope_all = latent.split([self.kv_lora_rank, self.rope], dim=-1)
        w_kvb = self.wkv_b.weight.view(heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_k, w_v = w_kvb[:, : self.nope], w_kvb[:, self.nope :]
        q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_k.to(q_nope.dtype))
        scores = torch.einsum("bshc,btc->bhst", q_latent, c_all.to(q_latent.dtype)) + torch.einsum(
            "bshr,btr->bhst", q_rope, k_rope_all.to(q_rope.dtype)
        )
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.scale
        scores = scores.masked_fill(~decode_mask(positions, key_pos, self.window), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(c_all.dtype)
        out_latent = torch.einsum("bhst,btc->bshc", probs, c_all)
        out = torch.einsum("bshc,hvc->bshv", out_latent, w_v.to(out_latent.dtype))
        return self.wo(out.reshape(bsz, seq, heads * self.v_dim))


def make_attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """The attention module of block `layer`: cfg.attn projections, windowed on local layers."""
    window = cfg.layer_window(layer)
    return MLAttention(cfg, window) if cfg.attn == "mla" else GQAttention(cfg, window)
