"""The optimizer and its parameter groups: the one place that decides who gets weight decay and which lr.

Groups come from the model's own classification (`Transformer.param_kinds()`):
- matrices (attention, dense and shared-expert FFNs, routed experts, routers): weight decay;
- norms and biases: no decay;
- embedding and output head: no decay unless optim.decay_embeddings, lr scaled by optim.embed_lr_scale
  (decided on purpose: decaying the embedding pulls rare tokens' rows to zero between their updates).
"""

from __future__ import annotations

import torch

from nmoe.train.config import OptimConfig

NO_DECAY_KINDS = ("norm", "bias")
EMBED_KINDS = ("embedding", "head")


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


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed norms and biases, embeddings (decay per config, lr scale)."""
    decay, no_decay, embed = [], [], []
    kinds = param_kinds(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
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
        {
            "params": embed,
            "weight_decay": cfg.weight_decay if cfg.decay_embeddings else 0.0,
            "lr_scale": cfg.embed_lr_scale,
            "name": "embeddings",
        },
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """torch AdamW (fused kernel on GPU) over param_groups(model, cfg)."""
    kwargs = {"fused": True} if fused else {"foreach": False}
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = lr x its lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
