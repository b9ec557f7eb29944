"""ModelConfig: the `[model]` section of a training TOML.

Convention (read by the trainer's generic loader through `dataclasses.fields`): field types are
int, float, str, bool or `X | None`; a field without a default is required; every field carries
`metadata["help"]` and, where it applies, `"range": (lo, hi)` (inclusive, None = unbounded) or
`"choices"`. Cross-field checks live in `__post_init__` and raise ValueError naming the keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

ATTN_GLOBAL = ("mla", "sdpa")
ATTN_LOCAL = ("swa", "none")
SCORE_FUNCS = ("sigmoid", "softmax")


def _f(help: str, default=dataclasses.MISSING, *, range=None, choices=None):
    """A dataclass field with the loader's metadata."""
    meta: dict = {"help": help}
    if range is not None:
        meta["range"] = range
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and routing of the DeepSeek-style MoE transformer (dense when n_dense_layers == n_layers)."""

    # --- trunk
    vocab_size: int = _f("vocabulary size (embedding rows and output-head columns)", range=(1, None))
    dim: int = _f("model (residual stream) width", range=(1, None))
    n_layers: int = _f("number of transformer blocks", range=(1, None))
    n_heads: int = _f("attention query heads", range=(1, None))
    n_kv_heads: int | None = _f(
        "sdpa/swa key-value heads for grouped-query attention (None = n_heads)", None, range=(1, None)
    )
    head_dim: int | None = _f("sdpa/swa head width (None = dim // n_heads)", None, range=(1, None))
    norm_eps: float = _f("RMSNorm epsilon", 1e-6, range=(0.0, 1.0))
    init_std: float = _f(
        "std of the normal init of weight matrices (output projections are scaled by 1/sqrt(2*n_layers))",
        0.02,
        range=(0.0, None),
    )
    max_seq_len: int = _f("longest sequence the RoPE tables cover", 4096, range=(1, None))

    # --- attention layout
    attn: str = _f("global attention type", "sdpa", choices=ATTN_GLOBAL)
    attn_local: str = _f(
        "local attention type for non-global layers ('none' = every layer global)", "none", choices=ATTN_LOCAL
    )
    attn_global_every: int = _f(
        "every N-th layer is global (layer i global iff (i+1) % N == 0); the last layer is always global",
        1,
        range=(1, None),
    )
    attn_local_window: int = _f(
        "sliding-window size in tokens (query attends to itself and the window-1 previous tokens)",
        1024,
        range=(1, None),
    )

    # --- MLA (DeepSeek-V2/V3 multi-head latent attention)
    q_lora_rank: int = _f("MLA low-rank query width (0 = full-rank query projection)", 0, range=(0, None))
    kv_lora_rank: int = _f("MLA compressed key-value latent width", 512, range=(1, None))
    qk_nope_head_dim: int = _f("MLA per-head query/key width without RoPE", 128, range=(1, None))
    qk_rope_head_dim: int = _f(
        "MLA decoupled RoPE query/key width (even; key part shared across heads)", 64, range=(2, None)
    )
    v_head_dim: int = _f("MLA per-head value width", 128, range=(1, None))

    # --- RoPE / YaRN
    rope_theta: float = _f("RoPE base", 10000.0, range=(1.0, None))
    rope_factor: float = _f("YaRN context-extension factor (1 = plain RoPE)", 1.0, range=(1.0, None))
    original_seq_len: int = _f("YaRN: context length the model was pre-trained at", 4096, range=(1, None))
    beta_fast: float = _f("YaRN: high-frequency boundary (rotations per original context)", 32.0, range=(0.0, None))
    beta_slow: float = _f("YaRN: low-frequency boundary (rotations per original context)", 1.0, range=(0.0, None))
    mscale: float = _f(
        "YaRN attention-temperature coefficient (softmax scale *= (0.1*mscale*ln(factor)+1)^2)", 1.0, range=(0.0, None)
    )

    # --- FFN
    inter_dim: int = _f("dense SwiGLU hidden width (used by the first n_dense_layers blocks)", 0, range=(0, None))
    n_dense_layers: int = _f(
        "leading blocks with a dense FFN; n_dense_layers == n_layers is a dense model", 1, range=(0, None)
    )
    n_routed_experts: int = _f("routed experts per MoE layer", 64, range=(1, None))
    n_shared_experts: int = _f("always-on shared experts per MoE layer (each moe_inter_dim wide)", 0, range=(0, None))
    moe_inter_dim: int = _f("hidden width of each routed/shared expert", 1408, range=(1, None))
    top_k: int = _f("routed experts per token", 6, range=(1, None))

    # --- routing
    score_func: str = _f("router score function", "sigmoid", choices=SCORE_FUNCS)
    route_norm: bool = _f("normalise the top-k gate weights to sum to 1 before route_scale", True)
    route_scale: float = _f("multiplier on the routed gate weights", 1.0, range=(0.0, None))
    n_groups: int = _f("expert groups for grouped routing (1 = off)", 1, range=(1, None))
    topk_groups: int = _f("groups each token may route into (<= n_groups)", 1, range=(1, None))
    bias_update_rate: float = _f(
        "aux-loss-free balancing: bias step per update_expert_bias() (0 = off)", 1e-3, range=(0.0, None)
    )
    balance_loss_coef: float = _f("sequence-level balance loss coefficient (0 = off)", 0.0, range=(0.0, None))
    z_loss_coef: float = _f("router z-loss coefficient (0 = off)", 0.0, range=(0.0, None))
    capacity_factor: float = _f(
        "expert capacity = ceil(factor * tokens * top_k / n_routed_experts); overflow "
        "(token, k) pairs are dropped and counted (0 = dropless)",
        0.0,
        range=(0.0, None),
    )

    def __post_init__(self) -> None:
        self._check_ranges()
        self._check_attention()
        self._check_ffn()

    def _check_ranges(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lo, hi = f.metadata.get("range", (None, None))
            if value is not None and "range" in f.metadata:
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    raise ValueError(f"model.{f.name} = {value} is outside [{lo}, {hi}] ({f.metadata['help']})")
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"model.{f.name} = {value!r}; choose one of {f.metadata['choices']}")

    def _check_attention(self) -> None:
        if self.attn == "sdpa":
            if self.head_dim is None and self.dim % self.n_heads:
                raise ValueError(
                    f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}): set model.head_dim "
                    "or change model.n_heads"
                )
            if self.kv_heads > self.n_heads or self.n_heads % self.kv_heads:
                raise ValueError(
                    f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads}): "
                    "change model.n_kv_heads"
                )
            if self.sdpa_head_dim % 2:
                raise ValueError(f"sdpa head_dim ({self.sdpa_head_dim}) must be even for RoPE: change model.head_dim")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: change model.qk_rope_head_dim")

    def _check_ffn(self) -> None:
        if self.n_dense_layers > self.n_layers:
            raise ValueError(
                f"n_dense_layers ({self.n_dense_layers}) > n_layers ({self.n_layers}): lower model.n_dense_layers"
            )
        if self.n_dense_layers > 0 and self.inter_dim == 0:
            raise ValueError(f"n_dense_layers = {self.n_dense_layers} needs a dense FFN width: set model.inter_dim > 0")
        if not self.has_moe:
            return
        if self.top_k > self.n_routed_experts:
            raise ValueError(
                f"top_k ({self.top_k}) > n_routed_experts ({self.n_routed_experts}): lower model.top_k "
                "or raise model.n_routed_experts"
            )
        if self.n_routed_experts % self.n_groups:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_groups "
                f"({self.n_groups}): change model.n_groups"
            )
        if self.topk_groups > self.n_groups:
            raise ValueError(f"topk_groups ({self.topk_groups}) > n_groups ({self.n_groups}): lower model.topk_groups")
        reachable = self.topk_groups * (self.n_routed_experts // self.n_groups)
        if self.top_k > reachable:
            raise ValueError(
                f"top_k ({self.top_k}) > experts reachable through topk_groups ({self.topk_groups} groups "
                f"x {self.n_routed_experts // self.n_groups}): raise model.topk_groups or lower "
                "model.top_k"
            )

    # --- derived shape helpers (not config keys)
    @property
    def kv_heads(self) -> int:
        """Key-value heads of sdpa/swa attention."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def sdpa_head_dim(self) -> int:
        """Head width of sdpa/swa attention."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def has_moe(self) -> bool:
        """True when at least one block has a routed-expert FFN."""
        return self.n_dense_layers < self.n_layers

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE blocks."""
        return tuple(range(self.n_dense_layers, self.n_layers))

    @property
    def yarn_enabled(self) -> bool:
        """YaRN frequency interpolation is on when rope_factor > 1."""
        return self.rope_factor > 1.0

    @property
    def attn_mscale(self) -> float:
        """YaRN attention temperature factor applied to the softmax scale (squared)."""
        if not self.yarn_enabled:
            return 1.0
        return 0.1 * self.mscale * math.log(self.rope_factor) + 1.0

    def is_global_layer(self, layer: int) -> bool:
        """Whether block `layer` uses global attention (else sliding-window)."""
        if self.attn_local == "none" or layer == self.n_layers - 1:
            return True
        return (layer + 1) % self.attn_global_every == 0

    def layer_window(self, layer: int) -> int | None:
        """Sliding-window size of block `layer`, None for global attention."""
        return None if self.is_global_layer(layer) else self.attn_local_window
