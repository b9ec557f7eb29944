"""The output head fused into cross-entropy, chunked over rows so that the [N,V] logits never exist whole.

Each chunk's logits are formed, reduced to per-row losses and, when gradients are wanted, turned in place into
dL/dlogits, which at once gives the chunk's dh rows and its share of dW (three GEMMs per chunk: the backward
needs no second pass over the logits). The autograd backward only scales the saved dh and dW.
"""

from __future__ import annotations

import torch


def _rows_reference(logits, targets, loss_out, scale, ignore_index: int, with_grad: bool) -> None:
    """Plain-PyTorch twin of `_kernels.cross_entropy_rows_kernel` (the CPU path)."""
    z = logits.to(loss_out.dtype)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    lse = torch.logsumexp(z, dim=1)
    loss_out.copy_(torch.where(valid, lse - z.gather(1, safe[:, None])[:, 0], 0.0))
    if with_grad:
        grad = torch.exp(z - lse[:, None])
        grad[torch.arange(z.shape[0], device=z.device), safe] -= 1.0
        logits.copy_(grad * torch.where(valid, scale, 0.0)[:, None])


def forward(h, weight, targets, chunk_size: int, ignore_index: int, with_grads: bool, on_triton: bool):
    """h[N,D], weight[V,D], targets[N] -> (mean loss (fp32, fp64 for fp64 input), dL/dh[N,D] or [0], dL/dW[V,D] or [0])."""
    n, d = h.shape
    acc_dtype = torch.promote_types(h.dtype, torch.float32)
    w_mm = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    valid = targets != ignore_index
    count = valid.sum().to(acc_dtype)
    scale = (1.0 / count).reshape(1)  # inf when every target is ignored: those rows get scale 0, the loss is nan
    loss_rows = torch.empty(n, dtype=acc_dtype, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if with_grads else h.new_empty(0)
    dw = None
    if with_grads:  # dW accumulates over chunks in (at least) fp32
        dw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=h.device)
    if on_triton:
        from nmoe.kernels._triton_ops import cross_entropy_rows as rows_fn
    else:
        rows_fn = _rows_reference
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        h_chunk = h[start:stop]
        logits = h_chunk @ w_mm.T
        rows_fn(logits, targets[start:stop], loss_rows[start:stop], scale, ignore_index, with_grads)
        if with_grads:  # logits now hold dL/dlogits
            torch.mm(logits, w_mm, out=dh[start:stop])
            dw += logits.T @ h_chunk
    loss = loss_rows.sum() / count
    return loss, dh, (dw.to(weight.dtype) if with_grads else weight.new_empty(0))
