"""Mixture-of-experts FFN: router (sigmoid/softmax, grouped top-k, aux-loss-free bias, capacity) +
routed experts through `nmoe.kernels.moe_experts` + shared SwiGLU experts.

Diagnostics accumulate in device buffers inside forward (no host sync); `read_stats()` is called
at log time. Counting happens in forward, so activation checkpointing that re-runs forward counts twice.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nmoe.kernels import moe_experts
from nmoe.model.config import ModelConfig
from nmoe.model.layers import SwiGLU

# torch.compile keeps the expert kernels out of the traced graph (a graph break at the one call site):
# inductor cannot yet lower nmoe.kernels' Triton autograd function, and the CPU reference syncs (.tolist()).
_moe_experts_opaque = torch.compiler.disable(moe_experts)


class Routing(NamedTuple):
    """Router decision for T tokens."""

    logits: torch.Tensor  # [T,E] router logits (float32, or float64 for float64 input)
    scores: torch.Tensor  # [T,E] sigmoid/softmax scores (differentiable)
    topk_ids: torch.Tensor  # [T,K] int64 distinct experts per token
    gates: torch.Tensor  # [T,K] top-k scores, normalised when route_norm (before route_scale)
    weights: torch.Tensor  # [T,K] combine weights = gates * route_scale * kept
    kept: torch.Tensor  # [T,K] bool: False where the capacity limit dropped the (token, k) pair


def _select_experts(biased: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Top-k expert ids [T,K] from biased scores [T,E], restricted to the best topk_groups groups."""
    if cfg.n_groups > 1:
        tokens = biased.shape[0]
        grouped = biased.view(tokens, cfg.n_groups, -1)
        per_group = min(2, grouped.shape[-1])  # a group's score: sum of its best two experts
        group_score = grouped.topk(per_group, dim=-1).values.sum(-1)
        best = group_score.topk(cfg.topk_groups, dim=-1).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
        biased = grouped.masked_fill(~allowed[..., None], float("-inf")).view(tokens, -1)
    return biased.topk(cfg.top_k, dim=-1).indices


def capacity_keep_mask(topk_ids: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """[T,K] bool: pair (t,k) is kept iff fewer than `capacity` earlier pairs chose its expert.

    Priority is k-major (every token's first choice before any second choice), then token order.
    """
    tokens, top_k = topk_ids.shape
    flat = topk_ids.t().reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return (rank < capacity).view(top_k, tokens).t()


def expert_capacity(cfg: ModelConfig, tokens: int) -> int:
    """Per-expert slot limit for `tokens` tokens (only meaningful when capacity_factor > 0)."""
    return math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.n_routed_experts)


def route(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor, cfg: ModelConfig) -> Routing:
    """Router for x[T,D] with gate_weight[E,D] and expert_bias[E] (selection only), in at least float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.to(dtype), gate_weight.to(dtype))
    scores = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
    topk_ids = _select_experts(scores.detach() + expert_bias.to(dtype), cfg)
    gates = scores.gather(1, topk_ids)
    if cfg.route_norm:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    if cfg.capacity_factor > 0:
        kept = capacity_keep_mask(topk_ids, cfg.n_routed_experts, expert_capacity(cfg, x.shape[0]))
    else:
        kept = torch.ones_like(topk_ids, dtype=torch.bool)
    weights = gates * cfg.route_scale * kept
    return Routing(logits, scores, topk_ids, gates, weights, kept)


def balance_loss(scores: torch.Tensor, topk_ids: torch.Tensor, batch: int, n_experts: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (before its coefficient): mean_b sum_e f_be * P_be.

    scores[B*S,E], topk_ids[B*S,K]; f = E/(K*S) * tokens routed to e in the sequence, P = mean normalised score.
    """
    seq, top_k = scores.shape[0] // batch, topk_ids.shape[1]
    probs = scores / scores.sum(dim=-1, keepdim=True)
    mean_prob = probs.view(batch, seq, n_experts).mean(dim=1)
    ids = topk_ids.view(batch, seq * top_k)
    counts = scores.new_zeros(batch, n_experts).scatter_add_(1, ids, torch.ones_like(ids, dtype=scores.dtype))
    frac = counts * (n_experts / (top_k * seq))
    return (frac * mean_prob).sum(dim=-1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (before its coefficient): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """Routed + shared SwiGLU experts with aux-loss-free bias balancing and on-device diagnostics."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_exp, dim, hidden = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.gate = nn.Parameter(torch.empty(n_exp, dim))
        self.w_up = nn.Parameter(torch.empty(n_exp, dim, 2 * hidden))  # [gate | up]
        self.w_down = nn.Parameter(torch.empty(n_exp, hidden, dim))
        self.shared = SwiGLU(dim, cfg.n_shared_experts * hidden) if cfg.n_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(n_exp))
        self.register_buffer("load_since_update", torch.zeros(n_exp), persistent=False)
        # stat_counts[E] | tokens, entropy sum, max-gate sum, dropped pairs
        self.register_buffer("stat_counts", torch.zeros(n_exp), persistent=False)
        self.register_buffer("stat_sums", torch.zeros(4), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x[B,S,D] -> (y[B,S,D], aux_loss scalar (router precision) incl. coefficients)."""
        bsz, seq, dim = x.shape
        flat = x.reshape(bsz * seq, dim)
        r = route(flat, self.gate, self.expert_bias, self.cfg)
        self._accumulate(r)
        y = self._routed(flat, r)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(bsz, seq, dim), self._aux_loss(r, bsz)

    def _routed(self, flat: torch.Tensor, r: Routing) -> torch.Tensor:
        w_up, w_down = self.w_up, self.w_down
        dtype = flat.dtype
        if torch.is_autocast_enabled(flat.device.type):
            dtype = torch.get_autocast_dtype(flat.device.type)
        return _moe_experts_opaque(flat.to(dtype), r.topk_ids, r.weights, w_up.to(dtype), w_down.to(dtype))

    def _aux_loss(self, r: Routing, batch: int) -> torch.Tensor:
        aux = r.logits.new_zeros(())
        if self.cfg.balance_loss_coef > 0:
            aux = aux + self.cfg.balance_loss_coef * balance_loss(
                r.scores, r.topk_ids, batch, self.cfg.n_routed_experts
            )
        if self.cfg.z_loss_coef > 0:
            aux = aux + self.cfg.z_loss_coef * z_loss(r.logits)
        return aux

    @torch.no_grad()
    def _accumulate(self, r: Routing) -> None:
        ids = r.topk_ids.reshape(-1)
        counts = torch.zeros_like(self.stat_counts).scatter_add_(
            0, ids, torch.ones_like(ids, dtype=self.stat_counts.dtype)
        )
        self.load_since_update.add_(counts)
        self.stat_counts.add_(counts)
        scores = r.scores.detach()
        probs = scores / scores.sum(dim=-1, keepdim=True)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
        sums = torch.stack((entropy, r.gates.detach().max(dim=-1).values.sum(), (~r.kept).sum().float()))
        self.stat_sums[0].add_(r.topk_ids.shape[0])
        self.stat_sums[1:].add_(sums.to(self.stat_sums.dtype))

    @torch.no_grad()
    def update_bias(self, reduce_fn=None) -> None:
        """Aux-loss-free balancing: bias += rate * sign(mean load - load), centred; resets the load window."""
        load = self.load_since_update.clone()
        if reduce_fn is not None:
            reduce_fn(load)
        step = self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_bias.add_(step.to(self.expert_bias.dtype))
        self.expert_bias.sub_(self.expert_bias.mean())
        self.load_since_update.zero_()

    @torch.no_grad()
    def take_stats(self) -> torch.Tensor:
        """Flat [E + 4 + E] float32 device tensor (counts | sums | bias), then resets the counters."""
        packed = torch.cat((self.stat_counts, self.stat_sums, self.expert_bias.float()))
        self.stat_counts.zero_()
        self.stat_sums.zero_()
        return packed
