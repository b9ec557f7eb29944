"""ModelConfig: the `[model]` section of a training TOML, and the field convention every config section uses.

Convention (read by the trainer's generic loader through `dataclasses.fields`): field types are
int, float, str, bool or `X | None`; a field without a default is required; every field carries
`metadata["help"]` and, where it applies, `"range": (lo, hi)` (inclusive, None = unbounded) or
`"choices"`, and `"operational": True` for keys that never change a run's numbers (paths, cadence).
`config_field` builds such a field and `field_problem` is the one check of a value against it.
Cross-field checks live in `__post_init__` and raise ValueError naming the keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ATTN_GLOBAL = ("mla", "sdpa")
ATTN_LOCAL = ("swa", "none")
SCORE_FUNCS = ("sigmoid", "softmax")
EXPERT_PRECISIONS = ("bf16", "fp8", "nvfp4")
INIT_SCHEMES = ("nmoe", "torchtitan", "wide")
INIT_HEAD_RULES = ("scheme", "init_std", "inv_sqrt_dim", "zero")
INIT_DEPTH_RULES = ("scheme", "sqrt_2L", "depth", "none")
INIT_OUT_PROJ_RULES = (*INIT_DEPTH_RULES, "zero")
INIT_EXPERT_RULES = ("scheme", "matrix", "fan_in")


def config_field(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    range: tuple | None = None,
    choices: tuple | None = None,
    operational: bool = False,
) -> Any:
    """A dataclass field carrying the config loader's metadata (help, range or choices, operational)."""
    meta: dict[str, Any] = {"help": help, "operational": operational}
    if range is not None:
        meta["range"] = range
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


def field_problem(value: Any, metadata: dict) -> str | None:
    """Why `value` violates its field's choices or range metadata, or None when it is allowed."""
    if "choices" in metadata and value not in metadata["choices"]:
        return f"is not allowed; choose one of {', '.join(map(repr, metadata['choices']))}"
    if "range" in metadata and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = metadata["range"]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"is out of range; allowed range is [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """Shape and routing of the DeepSeek-style MoE transformer (dense when n_dense_layers == n_layers)."""

    # --- trunk
    vocab_size: int = config_field(help="vocabulary size (embedding rows and output-head columns)", range=(1, None))
    dim: int = config_field(help="model (residual stream) width", range=(1, None))
    n_layers: int = config_field(help="number of transformer blocks", range=(1, None))
    n_heads: int = config_field(help="attention query heads", range=(1, None))
    n_kv_heads: int | None = config_field(
        None, "sdpa/swa key-value heads for grouped-query attention (None = n_heads)", range=(1, None)
    )
    head_dim: int | None = config_field(None, "sdpa/swa head width (None = dim // n_heads)", range=(1, None))
    norm_eps: float = config_field(1e-6, "RMSNorm epsilon", range=(0.0, 1.0))
    init_std: float | None = config_field(
        None,
        "std of the normal init of weight matrices (output projections scaled per model.init_out_proj); None: "
        "init_scheme's (nmoe and torchtitan 0.02, wide 0.03)",
        range=(0.0, None),
    )
    max_seq_len: int = config_field(4096, "longest sequence the RoPE tables cover", range=(1, None))

    # --- attention layout
    attn: str = config_field("sdpa", "global attention type", choices=ATTN_GLOBAL)
    attn_local: str = config_field(
        "none", "local attention type for non-global layers ('none' = every layer global)", choices=ATTN_LOCAL
    )
    attn_global_every: int = config_field(
        1,
        "every N-th layer is global (layer i global iff (i+1) % N == 0); the last layer is always global",
        range=(1, None),
    )
    attn_local_window: int = config_field(
        1024,
        "sliding-window size in tokens (query attends to itself and the window-1 previous tokens)",
        range=(1, None),
    )

    # --- MLA (DeepSeek-V2/V3 multi-head latent attention)
    q_lora_rank: int = config_field(0, "MLA low-rank query width (0 = full-rank query projection)", range=(0, None))
    kv_lora_rank: int = config_field(512, "MLA compressed key-value latent width", range=(1, None))
    qk_nope_head_dim: int = config_field(128, "MLA per-head query/key width without RoPE", range=(1, None))
    qk_rope_head_dim: int = config_field(
        64, "MLA decoupled RoPE query/key width (even; key part shared across heads)", range=(2, None)
    )
    v_head_dim: int = config_field(128, "MLA per-head value width", range=(1, None))

    # --- RoPE / YaRN
    rope_theta: float = config_field(10000.0, "RoPE base", range=(1.0, None))
    rope_factor: float = config_field(1.0, "YaRN context-extension factor (1 = plain RoPE)", range=(1.0, None))
    original_seq_len: int = config_field(4096, "YaRN: context length the model was pre-trained at", range=(1, None))
    beta_fast: float = config_field(
        32.0, "YaRN: high-frequency boundary (rotations per original context)", range=(0.0, None)
    )
    beta_slow: float = config_field(
        1.0, "YaRN: low-frequency boundary (rotations per original context)", range=(0.0, None)
    )
    mscale: float = config_field(
        1.0, "YaRN attention-temperature coefficient (softmax scale *= (0.1*mscale*ln(factor)+1)^2)", range=(0.0, None)
    )

    # --- FFN
    inter_dim: int = config_field(
        0, "dense SwiGLU hidden width (used by the first n_dense_layers blocks)", range=(0, None)
    )
    n_dense_layers: int = config_field(
        1, "leading blocks with a dense FFN; n_dense_layers == n_layers is a dense model", range=(0, None)
    )
    n_routed_experts: int = config_field(64, "routed experts per MoE layer", range=(1, None))
    n_shared_experts: int = config_field(
        0, "always-on shared experts per MoE layer (each moe_inter_dim wide)", range=(0, None)
    )
    moe_inter_dim: int = config_field(1408, "hidden width of each routed/shared expert", range=(1, None))
    top_k: int = config_field(6, "routed experts per token", range=(1, None))

    # --- routing
    score_func: str = config_field("sigmoid", "router score function", choices=SCORE_FUNCS)
    route_norm: bool = config_field(True, "normalise the top-k gate weights to sum to 1 before route_scale")
    route_scale: float = config_field(1.0, "multiplier on the routed gate weights", range=(0.0, None))
    n_groups: int = config_field(1, "expert groups for grouped routing (1 = off)", range=(1, None))
    topk_groups: int = config_field(1, "groups each token may route into (<= n_groups)", range=(1, None))
    bias_update_rate: float = config_field(
        1e-3, "aux-loss-free balancing: bias step per update_expert_bias() (0 = off)", range=(0.0, None)
    )
    balance_loss_coef: float = config_field(0.0, "sequence-level balance loss coefficient (0 = off)", range=(0.0, None))
    z_loss_coef: float = config_field(0.0, "router z-loss coefficient (0 = off)", range=(0.0, None))
    capacity_factor: float = config_field(
        0.0,
        "expert capacity = ceil(factor * tokens * top_k / n_routed_experts); overflow "
        "(token, k) pairs are dropped and counted (0 = dropless)",
        range=(0.0, None),
    )

    # --- precision of the routed experts
    expert_precision: str = config_field(
        "bf16",
        "routed-expert GEMMs and weights: bf16; fp8 (E4M3 GEMMs forward and backward, fp32 master weights; "
        "sm_89+); nvfp4 (weights stored as NVFP4 and updated by the NVFP4 AdamW; on Hopper the GEMMs run in "
        "bf16 on the dequantised weights, NVFP4 tensor-core GEMMs are Blackwell-only)",
        choices=EXPERT_PRECISIONS,
    )
    fp8_scaling: str = config_field(
        "rowwise",
        "fp8 scales: rowwise (per row / per output column) or blockwise (1x128 activations, 128x128 weights)",
        choices=("rowwise", "blockwise"),
    )
    fp8_wgrad: bool = config_field(
        True,
        "fp8: the expert weight-gradient GEMMs in fp8 too (default; rowwise: act's and d_pre's codes reused, x "
        "and dy quantised per column, faster and leaner on Hopper than bf16 dW, bench/RESULTS.md; blockwise: per "
        "128-row chunk and column, slower than bf16 dW on Hopper); false: in bf16 on the unquantised activations "
        "and gradients",
    )
    fp8_fast_accum: bool = config_field(
        True,
        "fp8 rowwise: keep Hopper's reduced-precision fp8 accumulator over all of K (torch's use_fast_accum; "
        "default, measured within 0.01 nats of bf16) instead of promoting each 128-element block to float32",
    )

    # --- init (each init_* key left at None / "scheme" takes its value from init_scheme)
    init_scheme: str = config_field(
        "wide",
        "defaults of init_std and the init_* keys: torchtitan (torchtitan 0.3.0 DeepSeek-V3's: matrices std 0.02, "
        "embedding std 1, head dim^-0.5, per-layer depth scaling of output projections, up projections and "
        "router), wide (torchtitan's rules with matrices at std 0.03 and routed experts at fan-in std; learns "
        "fastest under AdamW, bench/RESULTS.md) or nmoe (before 2026-11-24: every matrix and the embedding std "
        "0.02, output projections / sqrt(2 n_layers))",
        choices=INIT_SCHEMES,
    )
    init_embed_std: float | None = config_field(
        None, "token-embedding init std (None: init_scheme's; nmoe init_std, torchtitan 1.0)", range=(0.0, None)
    )
    init_head: str = config_field(
        "scheme",
        "output-head init: init_std, inv_sqrt_dim (std dim^-0.5, truncated at 3 std) or zero; scheme: nmoe "
        "init_std, torchtitan inv_sqrt_dim",
        choices=INIT_HEAD_RULES,
    )
    init_out_proj: str = config_field(
        "scheme",
        "scaling of output projections (wo, w2, w_down): sqrt_2L (/ sqrt(2 n_layers)), depth (/ sqrt(2 (layer + "
        "1)) per layer, also applied to the up half of SwiGLU gate|up projections, as torchtitan), none, zero "
        "(every block starts as the identity); scheme: nmoe sqrt_2L, torchtitan depth",
        choices=INIT_OUT_PROJ_RULES,
    )
    init_router: str = config_field(
        "scheme",
        "scaling of the router (gate) init std: none, sqrt_2L or depth as in init_out_proj; scheme: nmoe none, "
        "torchtitan depth",
        choices=INIT_DEPTH_RULES,
    )
    init_router_std: float | None = config_field(
        None, "router init std before init_router's scaling (None: init_std)", range=(0.0, None)
    )
    init_experts: str = config_field(
        "scheme",
        "routed-expert base std: matrix (init_expert_std) or fan_in (w_up dim^-0.5, w_down moe_inter_dim^-0.5); "
        "init_out_proj's scaling applies on top; scheme: nmoe and torchtitan matrix, wide fan_in",
        choices=INIT_EXPERT_RULES,
    )
    init_expert_std: float | None = config_field(
        None, "routed-expert base std with init_experts = matrix (None: init_std)", range=(0.0, None)
    )

    def __post_init__(self) -> None:
        self._check_ranges()
        self._check_attention()
        self._check_ffn()
        self._check_init()
        if self.expert_precision == "fp8" and self.fp8_fast_accum and self.fp8_scaling == "blockwise":
            raise ValueError(
                "model.fp8_fast_accum = true needs model.fp8_scaling = 'rowwise': blockwise scales change every 128 "
                "elements of K, so each block is promoted to float32 anyway; set model.fp8_fast_accum = false"
            )

    def _check_ranges(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = None if value is None else field_problem(value, f.metadata)
            if problem:
                raise ValueError(f"model.{f.name} = {value!r} {problem} ({f.metadata['help']})")

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

    def _check_init(self) -> None:
        if self.init_experts == "fan_in" and self.init_expert_std is not None:
            raise ValueError(
                f"model.init_expert_std = {self.init_expert_std} has no effect with model.init_experts = 'fan_in' "
                "(fan-in sets the expert std): unset one of them"
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
