"""Muon: momentum whose update is orthogonalised per matrix (Newton–Schulz quintic) — for 2-D and 3-D weights.

One step of a parameter W with gradient G (decoupled weight decay, as in AdamW):
    M ← μ M + (1 - μ) G                     (momentum buffer, an EMA of the gradient; fp32 like W)
    U ← (1 - μ) G + μ M   if nesterov, else M
    W ← W (1 - lr · wd) - lr · s · orth(U)
orth(U) ≈ U' V'ᵀ of U's SVD (every singular value pushed towards 1, the singular vectors kept), computed
by five steps of the quintic X ← a X + (b A + c A²) X with A = X Xᵀ, in bf16 from X = U / ‖U‖_F.
(a, b, c) = (3.4445, -4.7750, 2.0315) is the published choice (Jordan et al., 2024) that maximises the
slope at 0: after five steps a singular value of at least 3e-3 ‖U‖_F lands in [0.68, 1.21] rather than
converging to exactly 1, which is accurate enough for a descent direction and takes five steps, not fifty.

s = 0.2 · sqrt(max(rows, cols)) matches the update's RMS to AdamW's typical ~0.2 (Liu et al., "Muon is
Scalable for LLM Training", 2025): orth(U) of an [A, B] matrix has RMS ≈ 1/sqrt(max(A, B)). It is chosen
over max(1, rows/cols)**0.5 because it is symmetric in the two axes (routed experts are stored [in, out]
while nn.Linear weights are [out, in], and this rule needs no convention for which is which) and because it
lets Muon reuse AdamW's learning rate and weight decay. The scale is a Python float of two integers: exact.

Batched matrices: a parameter [..., A, B] (routed experts [E, D, 2H] / [E, H, D]) is orthogonalised per
matrix of its leading dims, so an expert's update is a function of that expert's gradient and momentum only:
the same whether the experts sit on one rank or are split over expert-parallel ranks.

Fused matrices: `splits` names parameters that hold several linear maps side by side (gate | up, q | k | v);
each is orthogonalised and scaled on its own, as the unfused model would be (see nmoe.train.optim.fused_splits).

One implementation for 2-D and 3-D (not torch.optim.Muon, which takes 2-D only and chooses its own
coefficients, eps and scaling): dense and expert matrices follow exactly the same arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
RMS_MATCH = 0.2

Split = tuple[int, tuple[int, ...]]  # (matrix axis -2 or -1, sizes of the maps fused along it)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """g[..., A, B] -> ≈ U Vᵀ per matrix (fp32, or fp64 when dtype is fp64): `steps` quintic Newton–Schulz steps in `dtype`."""
    if g.dim() > 2 and g.device.type == "cpu":
        # the CPU's batched bf16 GEMMs choose their kernel by batch count (one expert's result changed with the
        # number of experts beside it): one matrix at a time keeps expert-parallel sharding bitwise there. CUDA
        # stays batched; tests/gpu_check_muon.py measures its sharding invariance.
        flat = g.reshape(-1, *g.shape[-2:])
        return torch.stack([_orthogonalize(m, steps, dtype) for m in flat]).reshape(g.shape)
    return _orthogonalize(g, steps, dtype)


def _orthogonalize(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    tall = g.size(-2) > g.size(-1)
    x = g.mT if tall else g  # iterate on the wide form: the Gram matrix X Xᵀ is the smaller one
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    x = (x / (torch.linalg.matrix_norm(x, keepdim=True) + NS_EPS)).to(dtype)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    x = x.to(torch.promote_types(dtype, torch.float32))
    return x.mT if tall else x


def rms_scale(rows: int, cols: int) -> float:
    """Multiplier of orth(U) for one [rows, cols] matrix: 0.2 * sqrt(max(rows, cols)) (AdamW's update RMS)."""
    return RMS_MATCH * math.sqrt(max(rows, cols))


def matrix_blocks(shape: torch.Size, split: Split | None) -> list[tuple[int, int, int]]:
    """[(axis, start, size)] of the separate linear maps of a [..., A, B] parameter (one block when unfused)."""
    if split is None:
        return [(-1, 0, shape[-1])]
    axis, sizes = split
    if axis not in (-2, -1) or sum(sizes) != shape[axis] or min(sizes) < 1:
        raise ValueError(f"split {split} does not tile axis {axis} of a parameter of shape {tuple(shape)}")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(axis, start, size) for start, size in zip(starts, sizes)]


def muon_direction(
    u: torch.Tensor, split: Split | None = None, steps: int = 5, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """u[..., A, B] -> the scaled update s · orth(u) of every block (fp32, u's shape); each block on its own."""
    out = torch.empty(u.shape, dtype=torch.promote_types(dtype, torch.float32), device=u.device)
    for axis, start, size in matrix_blocks(u.shape, split):
        block = u.narrow(axis, start, size)
        out.narrow(axis, start, size).copy_(orthogonalize(block, steps, dtype).mul_(rms_scale(*block.shape[-2:])))
    return out


class Muon(torch.optim.Optimizer):
    """Muon over matrices [A, B] and batched matrices [..., A, B]; state: `momentum_buffer` (the parameter's shape).

    `splits` {parameter: (axis, sizes)} marks fused parameters whose blocks are orthogonalised separately.
    The state of a batched parameter keeps its leading dims (an expert's momentum is row e of the buffer),
    so checkpoints can slice and re-shard it by expert like the weight itself.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        splits: Mapping[torch.Tensor, Split] | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum {momentum} must be in [0, 1)")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps {ns_steps} must be at least 1")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.splits = dict(splits or {})
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(
                        f"Muon orthogonalises matrices; got a parameter of shape {tuple(p.shape)}: give vectors "
                        "(norms, biases) to AdamW"
                    )
                matrix_blocks(p.shape, self.splits.get(p))  # fail now on a split that does not fit

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                grad = p.grad.to(buf.dtype)
                buf.lerp_(grad, 1.0 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                direction = muon_direction(update, self.splits.get(p), group["ns_steps"], self.ns_dtype)
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(direction.to(p.dtype), alpha=-lr)
        return loss
