"""RouterStats: per-MoE-layer router diagnostics read from device accumulators at log time."""

from __future__ import annotations

from dataclasses import dataclass

COLLAPSE_THRESHOLD = 0.1  # an expert "collapsed" when it got < 10% of its uniform share of routed slots


@dataclass(frozen=True)
class LayerRouterStats:
    """Diagnostics of one MoE layer over the steps since the previous read."""

    layer: int  # block index in the transformer
    tokens: int  # tokens routed
    tokens_per_expert: tuple[float, ...]  # routed (token, k) slots per expert (before capacity drops)
    load_cv: float  # std / mean of tokens_per_expert (0 = perfectly balanced)
    entropy_mean: float  # mean over tokens of the entropy (nats) of the normalised router scores over all experts
    max_gate_mean: float  # mean over tokens of the largest top-k gate (normalised, before route_scale)
    collapse_frac: float  # fraction of experts with load < COLLAPSE_THRESHOLD * mean load
    dropped_tokens: int  # (token, k) pairs dropped by the capacity limit
    bias: tuple[float, ...]  # current aux-loss-free expert bias

    @property
    def dropped_frac(self) -> float:
        """Dropped (token, k) pairs over all routed pairs."""
        slots = sum(self.tokens_per_expert)
        return self.dropped_tokens / slots if slots else 0.0

    @classmethod
    def from_packed(cls, layer: int, packed: list[float], n_experts: int) -> LayerRouterStats:
        """Build from a layer's packed accumulator [counts E | tokens, entropy sum, max-gate sum, dropped | bias E]."""
        counts = packed[:n_experts]
        tokens, entropy_sum, max_gate_sum, dropped = packed[n_experts : n_experts + 4]
        bias = packed[n_experts + 4 :]
        mean = sum(counts) / n_experts
        if mean > 0:
            var = sum((c - mean) ** 2 for c in counts) / n_experts
            cv = var**0.5 / mean
            collapse = sum(c < COLLAPSE_THRESHOLD * mean for c in counts) / n_experts
        else:
            cv, collapse = 0.0, 0.0
        per_token = 1.0 / tokens if tokens else 0.0
        return cls(
            layer=layer,
            tokens=int(tokens),
            tokens_per_expert=tuple(counts),
            load_cv=cv,
            entropy_mean=entropy_sum * per_token,
            max_gate_mean=max_gate_sum * per_token,
            collapse_frac=collapse,
            dropped_tokens=int(dropped),
            bias=tuple(bias),
        )

    def scalars(self) -> dict[str, float]:
        """Summary scalars of this layer keyed `router/layerNN/<name>`."""
        prefix = f"router/layer{self.layer:02d}/"
        counts = self.tokens_per_expert
        mean = sum(counts) / len(counts)
        values = {
            "load_cv": self.load_cv,
            "load_max_over_mean": max(counts) / mean if mean else 0.0,
            "entropy_mean": self.entropy_mean,
            "max_gate_mean": self.max_gate_mean,
            "collapse_frac": self.collapse_frac,
            "dropped_tokens": float(self.dropped_tokens),
            "dropped_frac": self.dropped_frac,
            "bias_min": min(self.bias),
            "bias_max": max(self.bias),
        }
        return {prefix + k: float(v) for k, v in values.items()}


@dataclass(frozen=True)
class RouterStats:
    """Diagnostics of every MoE layer since the previous `Transformer.router_stats()` call."""

    layers: tuple[LayerRouterStats, ...]

    def expert_loads(self) -> dict[str, tuple[float, ...]]:
        """Per-layer routed slots per expert, keyed `router/layerNN/expert_load` (for the load heatmap)."""
        return {f"router/layer{layer.layer:02d}/expert_load": layer.tokens_per_expert for layer in self.layers}

    def as_scalars(self) -> dict[str, float]:
        """Flat {tag: value} for the metrics writer, e.g. `router/layer03/load_cv`, plus `router/mean/*` averages."""
        out: dict[str, float] = {}
        for layer in self.layers:
            out.update(layer.scalars())
        if self.layers:
            names = [k.rsplit("/", 1)[1] for k in self.layers[0].scalars()]
            for name in names:
                vals = [out[f"router/layer{layer.layer:02d}/{name}"] for layer in self.layers]
                out[f"router/mean/{name}"] = sum(vals) / len(vals)
        return out
