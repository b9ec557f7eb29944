"""Mixture-of-experts FFN: router (sigmoid/softmax, grouped top-k, aux-loss-free bias), capacity limit,
routed experts through an expert-dispatch seam (`nmoe.model.dispatch`), shared SwiGLU experts.

A rank holds E / ep_size routed experts (global indices [expert_offset, expert_offset + E / ep_size));
the router is replicated. Diagnostics accumulate in device buffers during training forwards only (no
host sync); `take_stats()` is read at log time. `forward_collect` returns a forward's counts instead of adding
them, so a caller that re-runs the forward (activation checkpointing) adds them once (`add_stats`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nmoe.kernels import drop_over_capacity, expert_capacity, expert_mlp, expert_mlp_fp8, moe_experts, moe_experts_fp8
from nmoe.model.config import ModelConfig
from nmoe.model.dispatch import ExpertDispatch, ExpertMLP, FusedExperts, LocalDispatch, in_activation_dtype
from nmoe.model.layers import SwiGLU


class Routing(NamedTuple):
    """Router decision for T tokens."""

    logits: torch.Tensor  # [T,E] router logits (float32, or float64 for float64 input)
    scores: torch.Tensor  # [T,E] sigmoid/softmax scores (differentiable)
    topk_ids: torch.Tensor  # [T,K] int64 distinct experts per token
    gates: torch.Tensor  # [T,K] top-k scores, normalised when route_norm (before route_scale)
    weights: torch.Tensor  # [T,K] combine weights = gates * route_scale


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
    return Routing(logits, scores, topk_ids, gates, gates * cfg.route_scale)


def _fp8_recipe(cfg: ModelConfig) -> dict:
    return dict(scaling=cfg.fp8_scaling, wgrad_fp8=cfg.fp8_wgrad, fast_accum=cfg.fp8_fast_accum)


def expert_mlp_of(cfg: ModelConfig) -> ExpertMLP:
    """The expert MLP over grouped rows (RdepDispatch's received rows) for model.expert_precision.

    nvfp4 stores the weights in NVFP4 (the optimizer's business) and runs the bf16 GEMMs on them on Hopper.
    """
    if cfg.expert_precision == "fp8":
        return functools.partial(expert_mlp_fp8, **_fp8_recipe(cfg))
    return in_activation_dtype(expert_mlp)


def fused_experts_of(cfg: ModelConfig) -> FusedExperts:
    """The fused gather -> expert MLP -> weighted combine op (LocalDispatch) for model.expert_precision."""
    if cfg.expert_precision == "fp8":  # both take the float32 masters: quantised / cast inside, float32 gradients
        return functools.partial(moe_experts_fp8, **_fp8_recipe(cfg))
    return moe_experts


def capacity_ids(topk_ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """topk_ids with -1 for the pairs model.capacity_factor drops (token order decides); unchanged when it is 0."""
    capacity = expert_capacity(topk_ids.shape[0], cfg.top_k, cfg.n_routed_experts, cfg.capacity_factor)
    return topk_ids if capacity is None else drop_over_capacity(topk_ids, cfg.n_routed_experts, capacity)


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

    def __init__(self, cfg: ModelConfig, ep_rank: int = 0, ep_size: int = 1):
        super().__init__()
        self.cfg = cfg
        n_exp, dim, hidden = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        if n_exp % ep_size:
            raise ValueError(f"n_routed_experts ({n_exp}) is not divisible by the expert-parallel size ({ep_size})")
        self.n_local = n_exp // ep_size
        self.expert_offset = ep_rank * self.n_local  # global index of local expert 0
        self.gate = nn.Parameter(torch.empty(n_exp, dim))
        self.w_up = nn.Parameter(torch.empty(self.n_local, dim, 2 * hidden))  # [gate | up]
        self.w_down = nn.Parameter(torch.empty(self.n_local, hidden, dim))
        self.shared = SwiGLU(dim, cfg.n_shared_experts * hidden) if cfg.n_shared_experts else None
        self.dispatcher: ExpertDispatch = LocalDispatch(n_exp, fused=fused_experts_of(cfg))
        self.register_buffer("expert_bias", torch.zeros(n_exp))
        self.register_buffer("load_since_update", torch.zeros(n_exp), persistent=False)
        # stat_counts[E] | tokens, entropy sum, max-gate sum, dropped pairs
        self.register_buffer("stat_counts", torch.zeros(n_exp), persistent=False)
        self.register_buffer("stat_sums", torch.zeros(4), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x[B,S,D] -> (y[B,S,D], aux_loss scalar (router precision) incl. coefficients); counts router load and
        statistics when training."""
        y, aux, stats = self.forward_collect(x)
        if stats is not None:
            self.add_stats(stats)
        return y, aux

    def forward_collect(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x[B,S,D] -> (y[B,S,D], aux_loss scalar, this forward's statistics [E + 4] float32 when training, else
        None), adding nothing to the module's buffers: pass the statistics to `add_stats` once."""
        bsz, seq, dim = x.shape
        flat = x.reshape(bsz * seq, dim)
        r = route(flat, self.gate, self.expert_bias, self.cfg)
        ids = capacity_ids(r.topk_ids, self.cfg)
        stats = self._stats_of(r, ids) if self.training else None
        y = self._routed(flat, ids, r.weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(bsz, seq, dim), self._aux_loss(r, bsz), stats

    def _routed(self, flat: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        dtype = flat.dtype
        if torch.is_autocast_enabled(flat.device.type):
            dtype = torch.get_autocast_dtype(flat.device.type)
        return self.dispatcher.experts(flat.to(dtype), ids, weights, self.w_up, self.w_down)

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
    def _stats_of(self, r: Routing, ids: torch.Tensor) -> torch.Tensor:
        """[E + 4] float32: load per expert | tokens, entropy sum, max-gate sum, dropped pairs."""
        flat_ids = r.topk_ids.reshape(-1)
        ones = torch.ones_like(flat_ids, dtype=self.stat_counts.dtype)
        counts = torch.zeros_like(self.stat_counts).scatter_add_(0, flat_ids, ones)
        scores = r.scores.detach()
        probs = scores / scores.sum(dim=-1, keepdim=True)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
        tokens = torch.full((), r.topk_ids.shape[0], dtype=torch.float32, device=counts.device)
        sums = torch.stack((tokens, entropy.float(), r.gates.detach().max(dim=-1).values.sum().float(),
                            (ids < 0).sum().float()))  # fmt: skip
        return torch.cat((counts, sums.to(counts.dtype)))

    @torch.no_grad()
    def add_stats(self, stats: torch.Tensor) -> None:
        """Add one forward's statistics (from `forward_collect`) to the load window and the log accumulators."""
        n_exp = self.stat_counts.numel()
        self.load_since_update.add_(stats[:n_exp])
        self.stat_counts.add_(stats[:n_exp])
        self.stat_sums.add_(stats[n_exp:])

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
        """Flat [E + 4] float32 device tensor of the accumulators (counts | sums), then resets them."""
        packed = torch.cat((self.stat_counts, self.stat_sums))
        self.stat_counts.zero_()
        self.stat_sums.zero_()
        return packed
