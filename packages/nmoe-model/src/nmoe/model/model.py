"""Transformer: embedding -> blocks (pre-norm attention + dense/MoE FFN) -> norm -> untied head."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nmoe.kernels import linear_cross_entropy
from nmoe.model.attention import make_attention, sliding_window_block_mask
from nmoe.model.config import ModelConfig
from nmoe.model.kv_cache import KVCache, LayerKV
from nmoe.model.layers import RMSNorm, SwiGLU, rope_tables
from nmoe.model.moe import MoE
from nmoe.model.stats import LayerRouterStats, RouterStats

PARAM_KINDS = ("embedding", "head", "norm", "bias", "router", "matrix", "expert")
# matrices that write into the residual stream: init std scaled per model.init_out_proj
_OUTPUT_PROJECTIONS = ("wo.weight", "w2.weight", "w_down")
# fused SwiGLU [gate | up] projections (rows of a Linear weight; last dim of the experts' w_up)
_GATE_UP_PROJECTIONS = ("w13.weight", "w_up")


class ModelOutput(NamedTuple):
    """Result of Transformer.forward."""

    logits: torch.Tensor | None  # [B,S,V] float32 (None when targets were given: the loss is fused)
    aux_loss: torch.Tensor  # scalar float32: routing losses with their coefficients (0 when off)
    loss: torch.Tensor | None = None  # scalar float32 mean cross-entropy over the targets (when given)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.inter_dim) if layer < cfg.n_dense_layers else MoE(cfg, ep_rank, ep_size)

    def forward(self, x, cos, sin, block_mask) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x[B,S,D] -> (x[B,S,D], aux loss scalar, router statistics (MoE.forward_collect) to add once); the
        last two None for dense blocks."""
        x = x + self.attn(self.attn_norm(x), cos, sin, block_mask)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, aux, stats = self.ffn.forward_collect(h)
            return x + y, aux, stats
        return x + self.ffn(h), None, None

    def decode(self, x: torch.Tensor, cos, sin, positions: torch.Tensor, kv: LayerKV) -> torch.Tensor:
        """Cached inference step (no aux loss): x[B,S,D] at absolute positions[S] -> x[B,S,D]."""
        x = x + self.attn.decode(self.attn_norm(x), cos, sin, positions, kv)
        h = self.ffn_norm(x)
        return x + (self.ffn(h)[0] if isinstance(self.ffn, MoE) else self.ffn(h))


class Transformer(nn.Module):
    """DeepSeek-shaped MoE (or dense) decoder. Construct under `torch.device("meta")` to size without memory.

    With ep_size > 1 each MoE layer holds the E / ep_size routed experts of expert-parallel rank ep_rank;
    `set_dispatcher` then connects them to the other ranks' (nmoe.model.dispatch.RdepDispatch).
    """

    def __init__(self, cfg: ModelConfig, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i, ep_rank, ep_size) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(self.rope_dim, cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._block_masks: dict = {}

    @property
    def rope_dim(self) -> int:
        """Width of the rotary part of each query/key head."""
        return self.cfg.qk_rope_head_dim if self.cfg.attn == "mla" else self.cfg.sdpa_head_dim

    @property
    def moe_layers(self) -> list[MoE]:
        """The MoE FFN modules in block order."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def set_activation_checkpointing(self, mode: str) -> None:
        """'none', 'moe' (re-run the forward of MoE blocks in backward instead of keeping their activations) or
        'all' (every block): less activation memory for about one more forward of those blocks."""
        if mode not in ("none", "moe", "all"):
            raise ValueError(f"activation checkpointing {mode!r}: choose none, moe or all")
        self.activation_checkpointing = mode

    def _checkpointed(self, block) -> bool:
        mode = getattr(self, "activation_checkpointing", "none")
        return torch.is_grad_enabled() and (mode == "all" or (mode == "moe" and isinstance(block.ffn, MoE)))

    def set_dispatcher(self, dispatcher) -> None:
        """Route every MoE layer's experts through `dispatcher` (an nmoe.model.dispatch.ExpertDispatch)."""
        for moe in self.moe_layers:
            moe.dispatcher = dispatcher

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """idx[B,S] int64 -> ModelOutput(logits[B,S,V] float32, aux_loss scalar float32).

        With targets[B,S] int64: ModelOutput(None, aux_loss, loss) where loss is the mean cross-entropy
        computed by the fused head + loss (nmoe.kernels.linear_cross_entropy): the [B*S, V] logits never exist.
        """
        h, aux = self.hidden(idx)
        if targets is not None:
            flat = h.reshape(-1, h.shape[-1])
            return ModelOutput(None, aux, linear_cross_entropy(flat, self.head.weight, targets.reshape(-1)))
        return ModelOutput(self.head(h).float(), aux)

    def hidden(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx[B,S] int64 -> (final normalised hidden states [B,S,D] (autocast dtype), aux_loss scalar float32)."""
        seq = idx.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {seq} > model.max_seq_len ({self.cfg.max_seq_len}): raise "
                "model.max_seq_len or shorten the batch"
            )
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        block_mask = self._local_block_mask(seq, idx.device)
        x = self.tok_emb(idx)
        aux = torch.zeros((), dtype=torch.float32, device=idx.device)
        for block in self.blocks:
            if self._checkpointed(block):  # the recompute in backward returns its statistics to nobody
                x, block_aux, stats = checkpoint(block, x, cos, sin, block_mask, use_reentrant=False)
            else:
                x, block_aux, stats = block(x, cos, sin, block_mask)
            if block_aux is not None:
                aux = aux + block_aux
            if stats is not None:
                block.ffn.add_stats(stats)
        h = self.norm(x)
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))  # what the head matmul would see under autocast
        return h, aux

    # ------------------------------------------------------------------ inference
    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `capacity` tokens (default model.max_seq_len)."""
        return KVCache(self.cfg, batch_size, self.cfg.max_seq_len if capacity is None else capacity)

    @torch.no_grad()
    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Cached inference: idx[B,S] int64 continues the cached sequences -> logits[B,S,V] float32.

        The first call passes the prompt (prefill), later calls the sampled tokens; equal to `forward`
        on the whole sequence so far (dropless routing; with model.capacity_factor > 0 the drops
        depend on how many tokens a call routes together). Separate from `forward`, which it leaves
        untouched; MoE router statistics accumulate as in any forward.
        """
        bsz, seq = idx.shape
        start, end = cache.position, cache.position + seq
        if bsz != cache.batch_size:
            raise ValueError(f"idx has {bsz} sequences but the cache was made for {cache.batch_size}")
        if end > cache.capacity:
            raise ValueError(f"{end} tokens exceed the cache capacity ({cache.capacity}): allocate a larger cache")
        positions = torch.arange(start, end, device=idx.device)
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.tok_emb(idx)
        for block, kv in zip(self.blocks, cache.layers):
            x = block.decode(x, cos, sin, positions, kv)
        cache.position = end
        return self.head(self.norm(x)).float()

    def _local_block_mask(self, seq: int, device: torch.device):
        """Flex block mask shared by the sliding-window layers; None when there are none or on CPU autograd."""
        if all(self.cfg.is_global_layer(i) for i in range(self.cfg.n_layers)):
            return None
        if device.type == "cpu" and torch.is_grad_enabled():
            return None  # FlexAttention has no CPU backward: attend() falls back to a dense window mask
        if torch.compiler.is_compiling():
            return sliding_window_block_mask(seq, self.cfg.attn_local_window, device)
        key = (seq, str(device))
        if key not in self._block_masks:
            self._block_masks[key] = sliding_window_block_mask(seq, self.cfg.attn_local_window, device)
        return self._block_masks[key]

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init by the model.init_* keys (see `init_rules`), independent of the expert-parallel
        layout; buffers reset.

        Each parameter is drawn from its own generator seeded by (seed, name); each routed expert's slice
        by (seed, name, global expert index), so ep_size = 1 and ep_size = N start from the same model.
        """
        rules = init_rules(self.cfg)
        kinds = self.param_kinds()
        offsets = {f"blocks.{b.layer}.ffn.": b.ffn.expert_offset for b in self.blocks if isinstance(b.ffn, MoE)}
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            spec = param_init_spec(self.cfg, rules, name, kinds[name])
            if spec is None:
                p.fill_(1.0)
            elif kinds[name] == "expert":
                first = offsets[name.rsplit(".", 1)[0] + "."]
                for i in range(p.shape[0]):
                    _draw(p[i], spec, _generator(p.device, seed, f"{name}[{first + i}]"), fused_dim=-1)
            else:
                _draw(p, spec, _generator(p.device, seed, name), fused_dim=0)
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        if self.rope_cos.device.type == "meta":
            return
        cos, sin = rope_tables(self.rope_dim, self.cfg, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.moe_layers:
            for buf in (moe.expert_bias, moe.load_since_update, moe.stat_counts, moe.stat_sums):
                buf.zero_()
        self._block_masks.clear()

    # ------------------------------------------------------------------ optimizer grouping
    def param_kinds(self) -> dict[str, str]:
        """{parameter name: kind}, kind in PARAM_KINDS (embedding, head, norm, bias, router, matrix, expert)."""
        kinds = {}
        norm_params = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        for name, p in self.named_parameters():
            if p is self.tok_emb.weight:
                kinds[name] = "embedding"
            elif p is self.head.weight:
                kinds[name] = "head"
            elif id(p) in norm_params:
                kinds[name] = "norm"
            elif name.endswith(".gate"):
                kinds[name] = "router"
            elif name.endswith((".w_up", ".w_down")):
                kinds[name] = "expert"
            elif p.dim() == 1:
                kinds[name] = "bias"
            else:
                kinds[name] = "matrix"
        return kinds

    # ------------------------------------------------------------------ routing control & diagnostics
    @torch.no_grad()
    def update_expert_bias(self, reduce_fn: Callable[[torch.Tensor], None] | None = None) -> None:
        """Aux-loss-free balancing step for every MoE layer from the load since the last call.

        `reduce_fn(load[E])` may sum the load across data-parallel ranks in place (e.g. dist.all_reduce)
        so every rank applies the same bias update. No-op when model.bias_update_rate == 0.
        """
        if self.cfg.bias_update_rate == 0:
            return
        for moe in self.moe_layers:
            moe.update_bias(reduce_fn)

    @torch.no_grad()
    def router_stats(self, reduce_fn: Callable[[torch.Tensor], None] | None = None) -> RouterStats:
        """Read (one host sync) and reset the router accumulators of every MoE layer.

        `reduce_fn(packed)` may sum the accumulators over data-parallel ranks in place so the statistics
        cover the global batch (every rank must then call this together).
        """
        mods = [(b.layer, b.ffn) for b in self.blocks if isinstance(b.ffn, MoE)]
        if not mods:
            return RouterStats(layers=())
        packed = torch.stack([m.take_stats() for _, m in mods])
        if reduce_fn is not None:
            reduce_fn(packed)
        bias = torch.stack([m.expert_bias.float() for _, m in mods])
        rows = torch.cat([packed, bias], dim=1).double().cpu().tolist()
        n_exp = self.cfg.n_routed_experts
        return RouterStats(
            layers=tuple(LayerRouterStats.from_packed(layer, row, n_exp) for (layer, _), row in zip(mods, rows))
        )


class InitRules(NamedTuple):
    """The init of every part, resolved from the model.init_* keys and model.init_scheme."""

    matrix_std: float  # weight matrices (model.init_std or the scheme's)
    embed_std: float
    head: str  # init_std | inv_sqrt_dim | zero
    out_proj: str  # sqrt_2L | depth | none | zero
    router: str  # sqrt_2L | depth | none
    router_std: float
    experts: str  # matrix | fan_in
    expert_std: float


class InitSpec(NamedTuple):
    """How one parameter is drawn: normal(0, std), or per half of a fused [gate | up] projection."""

    std: float  # the whole tensor, or its gate half when up_std is set
    up_std: float | None = None  # the up half of a fused SwiGLU gate|up projection
    truncate: bool = False  # truncated at +-3 std


_TORCHTITAN = dict(
    matrix_std=0.02, embed_std=1.0, head="inv_sqrt_dim", out_proj="depth", router="depth", experts="matrix"
)
_SCHEME_RULES = {
    "nmoe": dict(matrix_std=0.02, embed_std=None, head="init_std", out_proj="sqrt_2L", router="none", experts="matrix"),
    "torchtitan": _TORCHTITAN,
    "wide": dict(_TORCHTITAN, matrix_std=0.03, experts="fan_in"),
}


def init_rules(cfg: ModelConfig) -> InitRules:
    """Resolve model.init_scheme and the init_* overrides into one InitRules."""
    scheme = _SCHEME_RULES[cfg.init_scheme]

    def pick(value, key):
        return scheme[key] if value == "scheme" else value

    matrix_std = scheme["matrix_std"] if cfg.init_std is None else cfg.init_std
    embed_std = cfg.init_embed_std if cfg.init_embed_std is not None else scheme["embed_std"]
    return InitRules(
        matrix_std=matrix_std,
        embed_std=matrix_std if embed_std is None else embed_std,
        head=pick(cfg.init_head, "head"),
        out_proj=pick(cfg.init_out_proj, "out_proj"),
        router=pick(cfg.init_router, "router"),
        router_std=matrix_std if cfg.init_router_std is None else cfg.init_router_std,
        experts=pick(cfg.init_experts, "experts"),
        expert_std=matrix_std if cfg.init_expert_std is None else cfg.init_expert_std,
    )


def depth_factor(rule: str, layer: int, n_layers: int) -> float:
    """Std multiplier of a depth-scaled matrix in block `layer`: sqrt_2L 1/sqrt(2L), depth 1/sqrt(2(layer+1)),
    zero 0, none 1."""
    if rule == "zero":
        return 0.0
    if rule == "sqrt_2L":
        return (2 * n_layers) ** -0.5
    if rule == "depth":
        return (2 * (layer + 1)) ** -0.5
    return 1.0


def param_init_spec(cfg: ModelConfig, rules: InitRules, name: str, kind: str) -> InitSpec | None:
    """InitSpec of parameter `name` of kind `kind` (Transformer.param_kinds); None for norms (init 1)."""
    if kind == "norm":
        return None
    if kind == "embedding":
        return InitSpec(rules.embed_std)
    if kind == "head":
        if rules.head == "inv_sqrt_dim":
            return InitSpec(cfg.dim**-0.5, truncate=True)
        if rules.head == "zero":
            return InitSpec(0.0)
        return InitSpec(rules.matrix_std)
    layer = int(name.split(".")[1]) if name.startswith("blocks.") else 0
    out_factor = depth_factor(rules.out_proj, layer, cfg.n_layers)
    # torchtitan's depth rule also scales the up projection (w3) of every SwiGLU
    up_factor = out_factor if rules.out_proj == "depth" else 1.0
    if kind == "router":
        return InitSpec(rules.router_std * depth_factor(rules.router, layer, cfg.n_layers))
    if kind == "expert":
        fan_in = rules.experts == "fan_in"
        if name.endswith(".w_down"):
            return InitSpec((cfg.moe_inter_dim**-0.5 if fan_in else rules.expert_std) * out_factor)
        base = cfg.dim**-0.5 if fan_in else rules.expert_std
        return _gate_up(base, up_factor)
    if name.endswith(_OUTPUT_PROJECTIONS):
        return InitSpec(rules.matrix_std * out_factor)
    if name.endswith(_GATE_UP_PROJECTIONS):
        return _gate_up(rules.matrix_std, up_factor)
    return InitSpec(rules.matrix_std)


def _gate_up(std: float, up_factor: float) -> InitSpec:
    return InitSpec(std) if up_factor == 1.0 else InitSpec(std, up_std=std * up_factor)


def _draw(p: torch.Tensor, spec: InitSpec, gen: torch.Generator, fused_dim: int) -> None:
    """Fill p in place from `gen`: standard (or +-3-truncated) normal draws scaled by the spec's std(s).

    fused_dim: the axis holding [gate | up] halves of a fused SwiGLU projection (used when spec.up_std is set).
    """
    if spec.truncate:
        torch.nn.init.trunc_normal_(p, 0.0, 1.0, -3.0, 3.0, generator=gen)
        p.mul_(spec.std)
        return
    if spec.up_std is None:
        p.normal_(0.0, spec.std, generator=gen)
        return
    half = p.shape[fused_dim] // 2
    p.normal_(0.0, 1.0, generator=gen)
    p.narrow(fused_dim, 0, half).mul_(spec.std)
    p.narrow(fused_dim, half, half).mul_(spec.up_std)


def _generator(device: torch.device, seed: int, key: str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    return gen


__all__ = [
    "Block",
    "InitRules",
    "InitSpec",
    "ModelOutput",
    "PARAM_KINDS",
    "Transformer",
    "init_rules",
    "param_init_spec",
]
