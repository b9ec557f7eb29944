"""Public ops: validate shapes, then call the `nmoe` custom ops (Triton on CUDA, the reference on CPU).

The checks here read only tensor metadata, so torch.compile(fullgraph=True) traces through them; the device
checks (architecture, dtype and alignment of the GPU path) run inside the ops and their fake implementations.
"""

from __future__ import annotations

import torch

from nmoe.kernels import _dispatch, _ops
from nmoe.kernels.errors import UnsupportedInput
from nmoe.kernels.reference import ExpertSort

# Kept importable from here (older call sites and tests).
GPU_DTYPES, ALIGN, SUPPORTED_CAPABILITIES = _dispatch.GPU_DTYPES, _dispatch.ALIGN, _dispatch.SUPPORTED_CAPABILITIES

DEFAULT_CE_CHUNK = 4096  # rows of logits formed at once by linear_cross_entropy (bf16 [4096, V])


def _check_ndim(name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if t.dim() != ndim:
        raise UnsupportedInput(f"{name} must be {shape_doc}; got shape {tuple(t.shape)}")


def _check_offsets(offsets: torch.Tensor, n_experts: int) -> None:
    _check_ndim("offsets", offsets, 1, "[E]")
    if offsets.shape[0] != n_experts or offsets.dtype != torch.int32:
        raise UnsupportedInput(f"offsets must be int32 [E={n_experts}]; got {offsets.dtype} {tuple(offsets.shape)}")


def _check_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> None:
    _check_ndim("x", x, 2, "[M,K]")
    _check_ndim("w", w, 3, "[E,K,N]")
    if x.shape[1] != w.shape[1]:
        raise UnsupportedInput(f"x[M,K] and w[E,K,N] disagree on K: {x.shape[1]} vs {w.shape[1]}")
    _check_offsets(offsets, w.shape[0])
    _dispatch.check_same_device(x, w, offsets)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x[M,K] @ w[e][K,N] per expert group (offsets[E] int32 cumulative end rows) -> [M,N]; rows >= offsets[-1] are 0."""
    _check_grouped_mm(x, w, offsets)
    return _ops.grouped_mm(x.contiguous(), w, offsets.contiguous())


def _check_topk(topk_ids: torch.Tensor) -> None:
    _check_ndim("topk_ids", topk_ids, 2, "[T,K]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise UnsupportedInput(f"topk_ids must be int32 or int64; got {topk_ids.dtype}")


def sort_by_expert(topk_ids: torch.Tensor, n_experts: int) -> ExpertSort:
    """topk_ids[T,K] in [0,E), -1 = dropped -> ExpertSort(counts[E] int32, offsets[E] int32, order[T*K] int64).

    Stable within an expert; dropped slots are not counted and come last in `order`. No host sync on the GPU.
    """
    _check_topk(topk_ids)
    if n_experts < 1:
        raise UnsupportedInput(f"n_experts must be positive; got {n_experts}")
    return ExpertSort(*_ops.sort_by_expert(topk_ids, n_experts))


def _check_expert_weights(w_up: torch.Tensor, w_down: torch.Tensor, d: int, rows_name: str) -> None:
    _check_ndim("w_up", w_up, 3, "[E,D,2H]")
    _check_ndim("w_down", w_down, 3, "[E,H,D]")
    n_experts, d_up, h2 = w_up.shape
    if d_up != d or h2 % 2:
        raise UnsupportedInput(f"{rows_name}[..,D={d}] and w_up {tuple(w_up.shape)} must be [..,D] and [E,D,2H]")
    if tuple(w_down.shape) != (n_experts, h2 // 2, d):
        raise UnsupportedInput(f"w_down must be [E,H,D]={(n_experts, h2 // 2, d)}; got {tuple(w_down.shape)}")


def _check_moe(x, topk_ids, topk_weights, w_up, w_down) -> None:
    _check_ndim("x", x, 2, "[T,D]")
    _check_topk(topk_ids)
    _check_ndim("w_up", w_up, 3, "[E,D,2H]")
    if topk_weights.shape != topk_ids.shape or not topk_weights.dtype.is_floating_point:
        raise UnsupportedInput(
            f"topk_weights must be float {tuple(topk_ids.shape)}; got {topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    if x.shape[0] != topk_ids.shape[0]:
        raise UnsupportedInput(f"x {tuple(x.shape)} and topk_ids {tuple(topk_ids.shape)} must be [T,D] and [T,K]")
    _check_expert_weights(w_up, w_down, x.shape[1], "x")
    _dispatch.check_same_device(x, topk_ids, topk_weights, w_up, w_down)


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """x[T,D], topk ids/weights[T,K], w_up[E,D,2H] (gate|up), w_down[E,H,D] -> y[T,D] = sum_k w_tk expert(x_t).

    topk_ids == -1 marks a slot dropped (e.g. by a capacity limit): it skips the expert GEMMs, adds 0 to y and
    gets a zero topk_weights gradient. The weights may be float32 masters under bf16 x: the GEMMs read them cast
    to bf16, and their gradients come back in float32 straight from the weight-gradient GEMM's accumulator.
    """
    _check_moe(x, topk_ids, topk_weights, w_up, w_down)
    return _ops.moe_experts(x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous(), w_up, w_down)[0]


def expert_mlp(rows: torch.Tensor, offsets: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """rows[M,D] grouped by expert (offsets[E] int32 end rows), w_up[E,D,2H], w_down[E,H,D] -> y[M,D].

    y = down(silu(gate) * up) per expert group; rows past offsets[-1] give 0. Autograd through rows, w_up, w_down.
    """
    _check_ndim("rows", rows, 2, "[M,D]")
    _check_expert_weights(w_up, w_down, rows.shape[1], "rows")
    _check_offsets(offsets, w_up.shape[0])
    _dispatch.check_same_device(rows, offsets, w_up, w_down)
    return _ops.expert_mlp(rows.contiguous(), offsets.contiguous(), w_up, w_down)[0]


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CE_CHUNK,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of logits h[N,D] @ weight[V,D]^T against targets[N] int64, without the [N,V] logits.

    Same value as F.cross_entropy(h @ weight.T, targets, ignore_index=ignore_index) (mean over non-ignored rows;
    plain CE, no z-loss). Logits are formed chunk_size rows at a time in h's dtype and reduced in fp32; dh and dW
    are computed in the forward (dW accumulated in fp32) and scaled in backward. weight may be float32 while h
    is bfloat16 (fp32 master weights): the GEMMs run in h's dtype and dW comes back in float32.
    """
    _check_ndim("h", h, 2, "[N,D]")
    _check_ndim("weight", weight, 2, "[V,D]")
    _check_ndim("targets", targets, 1, "[N]")
    if weight.shape[1] != h.shape[1] or targets.shape[0] != h.shape[0]:
        raise UnsupportedInput(
            f"h {tuple(h.shape)}, weight {tuple(weight.shape)} and targets {tuple(targets.shape)} must be "
            "[N,D], [V,D] and [N]"
        )
    if targets.dtype != torch.int64:
        raise UnsupportedInput(f"targets must be int64 (class indices); got {targets.dtype}")
    if not h.dtype.is_floating_point or weight.dtype not in (h.dtype, torch.float32):
        raise UnsupportedInput(f"h must be float and weight of h's dtype or float32; got {h.dtype} and {weight.dtype}")
    if chunk_size < 1:
        raise UnsupportedInput(f"chunk_size must be positive; got {chunk_size}")
    _dispatch.check_same_device(h, weight, targets)
    with_grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ops.linear_cross_entropy(
        h.contiguous(), weight.contiguous(), targets.contiguous(), chunk_size, ignore_index, with_grads
    )[0]
