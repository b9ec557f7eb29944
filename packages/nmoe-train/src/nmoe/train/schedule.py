"""Learning-rate schedules: wsd (warmup → constant → linear warmdown) and cosine."""

from __future__ import annotations

import math

from nmoe.train.config import OptimConfig


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "wsd":
        start_down = total_steps - cfg.warmdown
        if cfg.warmdown and step >= start_down:
            frac = (total_steps - step) / cfg.warmdown  # 1 → 1/warmdown at the last step
            return floor + (cfg.lr - floor) * frac
        return cfg.lr
    span = max(1, total_steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
