"""The optimizer and its parameter groups: the one place that decides who gets weight decay and which lr.

Groups come from the model's own classification (`Transformer.param_kinds()`).

optim.optimizer = "adamw" — one torch AdamW:
- matrices (attention, dense and shared-expert FFNs, routed experts, routers): weight decay;
- norms and biases: no decay;
- embedding and output head: no decay unless optim.decay_embeddings, lr scaled by optim.embed_lr_scale
  (decided on purpose: decaying the embedding pulls rare tokens' rows to zero between their updates).

optim.optimizer = "muon" — AdamW as above for embedding, head, norms, biases and routers (router and head rows
are per-class score vectors, for experts and for tokens, not a map between hidden spaces, which is where an
orthogonalised update is justified; modded-nanogpt and nanochat keep the head on AdamW for this reason);
`nmoe.train.muon.Muon` for the kinds "matrix" (2-D) and "expert" (3-D, orthogonalised per expert), at peak lr
optim.muon_lr. Both live in one `ChainedOptimizer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from nmoe.train.config import OptimConfig
from nmoe.train.muon import Muon, Split
from nmoe.train.runtime import SetupError

NO_DECAY_KINDS = ("norm", "bias")
EMBED_KINDS = ("embedding", "head")
MUON_KINDS = ("matrix", "expert")
ADAMW_KINDS_WITH_MUON = ("router", *NO_DECAY_KINDS, *EMBED_KINDS)


def param_kinds(model: torch.nn.Module) -> dict[str, str]:
    """{name: kind}: the model's own answer (embedding, head, norm, bias, router, matrix, expert) when it has one."""
    if hasattr(model, "param_kinds"):
        return model.param_kinds()
    return {
        n: ("matrix" if p.ndim >= 2 else "bias" if n.endswith(".bias") else "norm") for n, p in model.named_parameters()
    }


def expert_names(model: torch.nn.Module) -> frozenset[str]:
    """Names of routed-expert tensors (sharded over expert-parallel ranks)."""
    return frozenset(n for n, kind in param_kinds(model).items() if kind == "expert")


def param_groups(model: torch.nn.Module, cfg: OptimConfig, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed norms and biases, embeddings (decay per config, lr scale).

    `exclude`: parameter names another optimizer updates (NVFP4-stored experts).
    """
    decay, no_decay, embed = [], [], []
    kinds = param_kinds(model)
    for name, p in model.named_parameters():
        if not p.requires_grad or name in exclude:
            continue
        kind = kinds[name]
        if kind in EMBED_KINDS:
            embed.append(p)
        elif kind in NO_DECAY_KINDS:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0, "name": "matrices"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "norms_biases"},
        _embedding_group(embed, cfg),
    ]
    return [g for g in groups if g["params"]]


def _embedding_group(params: list, cfg: OptimConfig) -> dict:
    decay = cfg.weight_decay if cfg.decay_embeddings else 0.0
    return {"params": params, "weight_decay": decay, "lr_scale": cfg.embed_lr_scale, "name": "embeddings"}


def muon_lr_scale(cfg: OptimConfig) -> float:
    """lr_scale of the Muon groups: set_lr gives them schedule(step) x muon_lr / lr (muon_lr 0: lr)."""
    if cfg.muon_lr == 0.0 or cfg.muon_lr == cfg.lr:
        return 1.0
    if cfg.lr == 0.0:
        raise SetupError(
            f"optim.muon_lr = {cfg.muon_lr} with optim.lr = 0: the schedule scales every group by optim.lr, so the "
            "Muon groups would never move. Set optim.lr > 0 (the AdamW groups' peak lr)."
        )
    return cfg.muon_lr / cfg.lr


def muon_param_groups(
    model: torch.nn.Module, cfg: OptimConfig, exclude: frozenset[str] = frozenset()
) -> tuple[list[dict], list[dict]]:
    """(AdamW groups: routers, norms and biases, embeddings; Muon groups: 2-D matrices, 3-D routed experts)."""
    by_kind: dict[str, list] = {}
    kinds = param_kinds(model)
    for name, p in model.named_parameters():
        if not p.requires_grad or name in exclude:
            continue
        kind = kinds[name]
        if kind not in MUON_KINDS + ADAMW_KINDS_WITH_MUON:
            raise ValueError(f"parameter {name} has kind {kind!r}, which optim.optimizer = 'muon' does not place")
        by_kind.setdefault(kind, []).append(p)
    adamw = [
        {"params": by_kind.get("router", []), "weight_decay": cfg.weight_decay, "lr_scale": 1.0, "name": "routers"},
        {
            "params": [p for k in NO_DECAY_KINDS for p in by_kind.get(k, [])],
            "weight_decay": 0.0,
            "lr_scale": 1.0,
            "name": "norms_biases",
        },
        _embedding_group([p for k in EMBED_KINDS for p in by_kind.get(k, [])], cfg),
    ]
    scale = muon_lr_scale(cfg)
    lr = cfg.lr * scale  # the peak, until set_lr sets the step's
    muon = [
        {"params": by_kind.get("matrix", []), "lr": lr, "lr_scale": scale, "name": "muon_matrices"},
        {"params": by_kind.get("expert", []), "lr": lr, "lr_scale": scale, "name": "muon_experts"},
    ]
    return [g for g in adamw if g["params"]], [g for g in muon if g["params"]]


def fused_splits(model: torch.nn.Module) -> dict[str, Split]:
    """{parameter name: (axis, sizes)} of matrices that hold several linear maps side by side.

    Muon orthogonalises each map on its own, as it would the unfused model's separate weights: the fusion is a
    kernel-layout choice and must not change the optimizer. Orthogonalising [gate | up] as one [D, 2H] matrix
    would instead share one spectrum between the two maps (neither half is then semi-orthogonal, and each gets
    a smaller step), and the result would differ from the same model written with two nn.Linear.
    - dense / shared-expert SwiGLU w13 [2H, D]: gate | up along rows;
    - routed experts w_up [E, D, 2H]: gate | up along the last axis, per expert;
    - GQA/MHA wqkv [(Hq + 2 Hkv) hd, D]: q | k | v along rows;
    - MLA wqkv_a [q | c_kv | k_rope, D]: its three down projections along rows.
    """
    from nmoe.model.attention import GQAttention, MLAttention
    from nmoe.model.layers import SwiGLU
    from nmoe.model.moe import MoE

    splits: dict[str, Split] = {}
    for prefix, m in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(m, SwiGLU):
            splits[f"{dot}w13.weight"] = (-2, (m.hidden, m.hidden))
        elif isinstance(m, MoE):
            hidden = m.w_up.shape[-1] // 2
            splits[f"{dot}w_up"] = (-1, (hidden, hidden))
        elif isinstance(m, GQAttention):
            q, kv = m.n_heads * m.head_dim, m.n_kv * m.head_dim
            splits[f"{dot}wqkv.weight"] = (-2, (q, kv, kv))
        elif isinstance(m, MLAttention):
            splits[f"{dot}wqkv_a.weight"] = (-2, tuple(m.split))
    names = dict(model.named_parameters())
    missing = sorted(set(splits) - set(names))
    if missing:
        raise RuntimeError(f"fused_splits names {missing[:3]}, which are not parameters of the model: update it")
    return splits


class ChainedOptimizer:
    """Several torch optimizers over disjoint parameters, seen as one by the trainer and the checkpoints.

    `param_groups` and the state_dict's parameter indices run through the parts in order, as they would
    through one optimizer holding all the groups; `state` is a read-only {parameter: state} over the parts.
    """

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]

    @property
    def state(self) -> Mapping[torch.Tensor, dict]:
        return MappingProxyType({p: s for part in self.parts for p, s in part.state.items()})

    @torch.no_grad()
    def step(self, closure=None):
        """Step every part (a closure is evaluated once, before)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """torch's format over all parts: parameter indices consecutive through the parts' groups."""
        state, groups, offset = {}, [], 0
        for part in self.parts:
            sd = part.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [dict(g, params=[offset + i for i in g["params"]]) for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Inverse of state_dict: each part gets its groups and the state of their parameters."""
        groups = list(state_dict["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}")
        for part in self.parts:
            mine, groups = groups[: len(part.param_groups)], groups[len(part.param_groups) :]
            ids = [i for g in mine for i in g["params"]]
            local = {saved: n for n, saved in enumerate(ids)}
            part.load_state_dict(
                {
                    "state": {local[i]: s for i, s in state_dict["state"].items() if i in local},
                    "param_groups": [dict(g, params=[local[i] for i in g["params"]]) for g in mine],
                }
            )

    def __repr__(self) -> str:
        return f"ChainedOptimizer({', '.join(type(p).__name__ for p in self.parts)})"


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool, nvfp4_stores=None, seed: int = 0):
    """optim.optimizer: torch AdamW (fused kernel on GPU) over param_groups, or AdamW + Muon (ChainedOptimizer).

    With `nvfp4_stores` ({expert name: NVFP4Tensor}, model.expert_precision = 'nvfp4') the routed experts are
    updated by the NVFP4 AdamW (their codes are the weights), whatever optim.optimizer says, and the rest
    by the configured optimizer.
    """
    kwargs = {"fused": True} if fused else {"foreach": False}
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)
    exclude = frozenset(nvfp4_stores or ())
    parts: list = []
    if cfg.optimizer == "adamw":
        parts.append(torch.optim.AdamW(param_groups(model, cfg, exclude), **adamw))
    else:
        parts += _adamw_and_muon(model, cfg, adamw, exclude)
    if nvfp4_stores:
        from nmoe.train.nvfp4 import NVFP4ExpertAdamW

        experts = {name: p for name, p in model.named_parameters() if name in nvfp4_stores}
        parts.append(NVFP4ExpertAdamW(experts, nvfp4_stores, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                      weight_decay=cfg.weight_decay, rule=cfg.nvfp4_rule, dither=cfg.nvfp4_dither,
                                      seed=seed))  # fmt: skip
    return parts[0] if len(parts) == 1 else ChainedOptimizer(*parts)


def _adamw_and_muon(model: torch.nn.Module, cfg: OptimConfig, adamw: dict, exclude: frozenset[str]) -> list:
    adamw_groups, muon_groups = muon_param_groups(model, cfg, exclude)
    by_name = dict(model.named_parameters())
    splits = {by_name[name]: split for name, split in fused_splits(model).items()}
    parts = []
    if adamw_groups:
        parts.append(torch.optim.AdamW(adamw_groups, **adamw))
    if muon_groups:
        muon = Muon(
            muon_groups,
            lr=cfg.lr,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps,
            weight_decay=cfg.muon_weight_decay,
            splits=splits,
        )
        parts.append(muon)
    return parts


def set_lr(optimizer, lr: float) -> None:
    """Every group's lr = lr x its lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
