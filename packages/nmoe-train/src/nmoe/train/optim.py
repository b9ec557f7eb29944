"""AdamW with parameter groups: decay on matrices; none on norms, biases and (by default) embeddings."""

from __future__ import annotations

import torch

from nmoe.train.config import OptimConfig

NO_DECAY_KINDS = ("norm", "bias")
EMBED_KINDS = ("embedding", "head")


def param_kind(model: torch.nn.Module, name: str, param: torch.Tensor) -> str:
    """One of embedding, head, norm, bias, expert, matrix (the model's own answer when it has one)."""
    if hasattr(model, "param_kind"):
        return model.param_kind(name)
    if param.ndim < 2:
        return "bias" if name.endswith(".bias") else "norm"
    return "matrix"


def is_expert_param(model: torch.nn.Module, name: str) -> bool:
    """True for routed-expert tensors (sharded over expert-parallel ranks in checkpoints)."""
    params = dict(model.named_parameters())
    if name in params:
        return param_kind(model, name, params[name]) == "expert"
    return False


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups: decayed matrices/experts, undecayed norms+biases, embeddings (decay per config, lr scale)."""
    decay, no_decay, embed = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = param_kind(model, name, p)
        if kind in EMBED_KINDS:
            embed.append(p)
        elif kind in NO_DECAY_KINDS:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0, "name": "matrices"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "norms_biases"},
        {"params": embed, "weight_decay": cfg.weight_decay if cfg.decay_embeddings else 0.0,
         "lr_scale": cfg.embed_lr_scale, "name": "embeddings"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool) -> torch.optim.AdamW:
    """torch AdamW (fused kernel on GPU) over param_groups(model, cfg)."""
    kwargs = {"fused": True} if fused else {"foreach": False}
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)
