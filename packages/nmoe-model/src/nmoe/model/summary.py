"""model_summary: parameter counts, training FLOPs per token and memory estimates from the config alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from nmoe.model.config import ModelConfig

GIB = 1024**3


@dataclass(frozen=True)
class LayerParams:
    """Parameter count of one block by part."""

    attn: int  # attention projections (matrices)
    attn_norms: int  # block norms + MLA latent norms
    ffn_dense: int  # dense SwiGLU or shared experts
    router: int  # router gate matrix
    routed: int  # all routed experts of the layer


def attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """(matrix params, norm params) of one attention module."""
    d, h = cfg.dim, cfg.n_heads
    if cfg.attn == "sdpa":
        hd, kv = cfg.sdpa_head_dim, cfg.kv_heads
        return d * (h + 2 * kv) * hd + h * hd * d, 0
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q_out = cfg.q_lora_rank if cfg.q_lora_rank else h * qk
    mats = d * (q_out + cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    mats += cfg.q_lora_rank * h * qk  # wq_b (0 without low-rank q)
    mats += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim * d
    return mats, cfg.q_lora_rank + cfg.kv_lora_rank


def layer_params(cfg: ModelConfig, layer: int) -> LayerParams:
    """Parameters of block `layer` by part."""
    attn, latent_norms = attention_params(cfg)
    norms = 2 * cfg.dim + latent_norms
    if layer < cfg.n_dense_layers:
        return LayerParams(attn, norms, 3 * cfg.dim * cfg.inter_dim, 0, 0)
    d, e, hid = cfg.dim, cfg.n_routed_experts, cfg.moe_inter_dim
    return LayerParams(attn, norms, 3 * d * cfg.n_shared_experts * hid, e * d, e * 3 * d * hid)


def attended_keys_mean(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to under causal (optionally windowed) attention, self included."""
    w = seq_len if window is None else min(window, seq_len)
    total = w * (w + 1) // 2 + (seq_len - w) * w
    return total / seq_len


def attention_flops_per_token(cfg: ModelConfig, layer: int, seq_len: int, causal: bool = True) -> float:
    """Forward score + value FLOPs per token of one layer; causal=False counts the full S x S square."""
    if cfg.attn == "mla":
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.sdpa_head_dim
    keys = attended_keys_mean(seq_len, cfg.layer_window(layer)) if causal else seq_len
    return 2.0 * cfg.n_heads * (d_qk + d_v) * keys


@dataclass(frozen=True)
class ModelSummary:
    """Sizes, training FLOPs and memory of a config at a given sequence length and micro-batch."""

    seq_len: int
    batch_size: int
    total_params: int
    active_params: int  # parameters touched per token (embedding/head included, routed experts scaled by top_k/E)
    embedding_params: int  # token embedding (the untied head is counted in head_params)
    head_params: int
    routed_expert_params: int  # all routed experts of all MoE layers
    matmul_flops_per_token: float  # training (fwd + bwd = 3x fwd) FLOPs of all weight matmuls incl. head & router
    attention_flops_per_token: float  # training FLOPs of QK^T and AV, causal/windowed (actual work)
    attention_flops_per_token_dense: float  # same counting the full S x S square (what flop counters report)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # AdamW m, v in fp32 plus an fp32 master copy when params are below fp32
    activation_bytes: int  # saved activations of one micro-batch under its activation checkpointing (estimate)
    attention_kinds: str

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token (fwd + bwd) with causal attention: the MFU numerator per token."""
        return self.matmul_flops_per_token + self.attention_flops_per_token

    @property
    def total_memory_bytes(self) -> int:
        """Params + grads + optimizer state + activations."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    def table(self) -> str:
        """Aligned plain-text table for `nmoe-train --dry-run`."""
        rows = [
            ("total params", _count(self.total_params)),
            ("active params / token", _count(self.active_params)),
            ("embedding params", _count(self.embedding_params)),
            ("head params", _count(self.head_params)),
            ("routed expert params", _count(self.routed_expert_params)),
            ("attention layers", self.attention_kinds),
            ("seq_len x batch", f"{self.seq_len} x {self.batch_size}"),
            ("train FLOPs / token", f"{self.flops_per_token / 1e9:.3f} GFLOP"),
            ("  matmul", f"{self.matmul_flops_per_token / 1e9:.3f} GFLOP"),
            ("  attention (causal)", f"{self.attention_flops_per_token / 1e9:.3f} GFLOP"),
            ("memory: params", _gib(self.param_bytes)),
            ("memory: grads", _gib(self.grad_bytes)),
            ("memory: optimizer", _gib(self.optimizer_bytes)),
            ("memory: activations", _gib(self.activation_bytes)),
            ("memory: total", _gib(self.total_memory_bytes)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit} ({n:,})"
    return f"{n:,}"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _attention_activation_bytes(cfg: ModelConfig, act: int) -> float:
    """Saved bytes per token of one attention module (projection outputs kept alive, q/k/v, output, lse)."""
    h = cfg.n_heads
    if cfg.attn == "sdpa":
        hd, kv = cfg.sdpa_head_dim, cfg.kv_heads
        # fused qkv output (v is a view of it), roped q and k, attention output, fp32 logsumexp
        return act * ((h + 2 * kv) * hd + (h + kv) * hd + h * hd) + 4 * h
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    latent = cfg.q_lora_rank + cfg.kv_lora_rank  # latent norms: fp32 input under autocast + low-precision output
    kv_b = h * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # v is a view of it
    return (4 + act) * latent + act * (kv_b + 2 * h * qk + h * cfg.v_head_dim) + 4 * h


def _layer_activation_bytes(cfg: ModelConfig, layer: int, act: int) -> float:
    """Saved bytes per token of one block (its two norms, attention, dense FFN or MoE)."""
    d = cfg.dim
    norm = 4 * d + 4 + act * d  # fp32 input + rstd, low-precision copy saved by the next matmul
    total = 2 * norm + _attention_activation_bytes(cfg, act)
    if layer < cfg.n_dense_layers:
        return total + act * 4 * cfg.inter_dim  # gate|up output, silu(gate), product
    k, hid, e = cfg.top_k, cfg.moe_inter_dim, cfg.n_routed_experts
    total += 4 * d + 8 * e  # fp32 router input, scores (+ logits)
    total += k * (act * 3 * hid + 20)  # per slot: gate|up and swiglu (gathered in the GEMM), routing indices
    return total + act * 4 * cfg.n_shared_experts * hid


CHECKPOINTING = ("none", "moe", "all")


def activation_bytes_per_token(cfg: ModelConfig, act_bytes: int = 2, checkpointing: str = "none") -> float:
    """Estimated bytes alive for backward per token: bf16 autocast over an fp32 residual stream, fused
    RMSNorm and flash-style attention (no S x S matrix), the fused routed experts (`moe_experts`) and the fused
    head + loss (`linear_cross_entropy`: no logits). checkpointing ('none', 'moe', 'all', as
    `Transformer.set_activation_checkpointing`): a re-run block keeps only its fp32 input, and at the peak one
    of them holds its activations again during its backward."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"activation checkpointing {checkpointing!r}: choose none, moe or all")
    d, act = cfg.dim, act_bytes
    kept, rerun = 0.0, [0.0]
    for layer in range(cfg.n_layers):
        block = _layer_activation_bytes(cfg, layer, act)
        if checkpointing == "all" or (checkpointing == "moe" and layer >= cfg.n_dense_layers):
            kept += 4 * d
            rerun.append(block)
        else:
            kept += block
    norm = 4 * d + 4 + act * d
    return kept + max(rerun) + norm + 4 * d  # final norm; the fused loss computes dL/dh (fp32) in its forward


def model_summary(
    cfg: ModelConfig,
    seq_len: int,
    batch_size: int = 1,
    param_bytes: int = 4,
    grad_bytes: int = 4,
    act_bytes: int = 2,
    checkpointing: str = "none",
) -> ModelSummary:
    """Summary of `cfg` for micro-batches of batch_size x seq_len; byte sizes per element as given; checkpointing
    as `Transformer.set_activation_checkpointing`."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
    layers = [layer_params(cfg, i) for i in range(cfg.n_layers)]
    emb = head = cfg.vocab_size * cfg.dim
    routed = sum(p.routed for p in layers)
    total = emb + head + cfg.dim + sum(p.attn + p.attn_norms + p.ffn_dense + p.router + p.routed for p in layers)
    routed_active = routed * cfg.top_k / cfg.n_routed_experts
    active = total - routed + round(routed_active)
    matmul = head + sum(p.attn + p.ffn_dense + p.router for p in layers) + routed_active
    attn = sum(attention_flops_per_token(cfg, i, seq_len) for i in range(cfg.n_layers))
    attn_dense = sum(attention_flops_per_token(cfg, i, seq_len, causal=False) for i in range(cfg.n_layers))
    optimizer = total * (8 + (4 if param_bytes < 4 else 0))
    kinds = Counter(
        cfg.attn if cfg.is_global_layer(i) else f"swa(w={cfg.attn_local_window})" for i in range(cfg.n_layers)
    )
    pattern = ", ".join(f"{kind} x{n}" for kind, n in kinds.items())
    return ModelSummary(
        seq_len=seq_len,
        batch_size=batch_size,
        total_params=total,
        active_params=active,
        embedding_params=emb,
        head_params=head,
        routed_expert_params=routed,
        matmul_flops_per_token=3 * 2 * matmul,
        attention_flops_per_token=3 * attn,
        attention_flops_per_token_dense=3 * attn_dense,
        param_bytes=total * param_bytes,
        grad_bytes=total * grad_bytes,
        optimizer_bytes=optimizer,
        activation_bytes=round(activation_bytes_per_token(cfg, act_bytes, checkpointing) * seq_len * batch_size),
        attention_kinds=pattern,
    )
