"""Building blocks: RMSNorm, RoPE with YaRN scaling, dense SwiGLU FFN."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nmoe.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim with a learned gain (init 1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., dim] -> same shape and dtype."""
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_frequencies(rot_dim: int, cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [rot_dim/2] float64, YaRN-interpolated when cfg.rope_factor > 1."""
    base = cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    if not cfg.yarn_enabled:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        # dimension index whose wavelength completes `rotations` turns over the original context
        return rot_dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), rot_dim - 1)
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 for fast (high-frequency) dims: left untouched; 0 for slow dims: fully interpolated
    return inv_freq / cfg.rope_factor * (1 - keep) + inv_freq * keep


def rope_tables(rot_dim: int, cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables [max_seq_len, rot_dim/2] float32."""
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float64)
    angles = torch.outer(pos, rope_frequencies(rot_dim, cfg))
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x[B,S,H,d] by position (half-split pairs (i, i+d/2)); cos/sin [S,d/2]; keeps x.dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: w2(silu(x W_gate) * x W_up), gate and up fused into one [2*hidden, dim] matrix."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., dim] -> [..., dim]."""
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)
