"""The expert-dispatch seam: how routed (token, k) pairs reach the experts that own them and come back.

Every dispatcher has the same surface:
- `dispatch(x[T,D], topk_ids[T,K], weights[T,K]) -> (rows[M,D], offsets[El] int32, handle)`: the rows this
  rank's El local experts must process, grouped by local expert (`offsets`: cumulative end rows);
- `combine(rows_out[M,D], handle) -> y[T,D] = sum_k weights[t,k] * expert_out(t,k)`;
- `experts(x, topk_ids, weights, w_up, w_down) -> y`: dispatch -> fused SwiGLU expert MLP -> combine. The weights
  are the master parameters as they are (float32 under autocast); each expert op reads them as its GEMMs need:
  `moe_experts` casts them inside and returns float32 gradients straight from its dW GEMM, `expert_mlp` is wrapped
  by `in_activation_dtype` (a cast outside), the fp8 ops quantise them straight from the masters.
A topk id of -1 is a pair dropped by the capacity limit (`nmoe.kernels.drop_over_capacity`): it is never
sent, never computed and contributes 0. `LocalDispatch` owns every expert and runs `experts` as one fused
op (`moe_experts`, or `moe_experts_fp8` in fp8: the gather fused into the up-projection, the weighted combine
into one kernel);
`RdepDispatch` moves rows to the experts' owners over nmoe.rdep (no collective on the expert path).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from nmoe.kernels import expert_mlp, moe_experts, sort_by_expert

# rows[M,D] grouped by expert, offsets[El] int32, w_up[El,D,2H], w_down[El,H,D] -> out[M,D]
ExpertMLP = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# x[T,D], topk_ids[T,K], weights[T,K], w_up[E,D,2H], w_down[E,H,D] -> y[T,D]: gather, expert MLP, weighted combine
FusedExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def in_activation_dtype(op):
    """An ExpertMLP or FusedExperts whose GEMMs read the weights (its last two arguments) in the activations' dtype
    (its first argument's): the master weights are cast first; their gradients come back in the master dtype."""

    @functools.wraps(op)
    def run(*args):
        *rest, w_up, w_down = args
        dtype = args[0].dtype
        return op(*rest, w_up.to(dtype), w_down.to(dtype))

    return run


BF16_MLP = in_activation_dtype(expert_mlp)


class ExpertDispatch(Protocol):
    """Where the routed experts live and how tokens reach them."""

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor) -> tuple[Any, Any, Any]: ...

    def combine(self, rows_out: torch.Tensor, handle: Any) -> torch.Tensor: ...

    def experts(
        self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
    ) -> torch.Tensor: ...


class LocalHandle(NamedTuple):
    """What LocalDispatch.combine needs from its dispatch."""

    token: torch.Tensor  # [M] int64: the token of each grouped row
    weight: torch.Tensor  # [M]: the routing weight of each grouped row
    n_tokens: int


class LocalDispatch:
    """Every routed expert on this rank (no expert parallelism).

    `experts` is the fused op `fused` (moe_experts; moe_experts_fp8 for fp8 experts), or, given an expert MLP
    over grouped rows, dispatch -> mlp -> combine (the composition the fused ops are tested against).
    """

    def __init__(self, n_experts: int, mlp: ExpertMLP | None = None, fused: FusedExperts = moe_experts):
        self.n_experts = n_experts
        self.mlp = mlp
        self.fused = fused

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor):
        """x[T,D] -> (rows[T*K,D] grouped by expert, offsets[E] int32, LocalHandle); no host sync.

        Dropped pairs (id -1) sort last, past offsets[-1], where the grouped GEMMs compute nothing (rows 0).
        """
        routing = sort_by_expert(topk_ids, self.n_experts)
        token = routing.order // topk_ids.shape[1]
        handle = LocalHandle(token, weights.reshape(-1)[routing.order], x.shape[0])
        return x[token], routing.offsets, handle

    def combine(self, rows_out: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        """rows_out[M,D] -> y[T,D] = sum of weight * row over each token's rows."""
        y = rows_out.new_zeros(handle.n_tokens, rows_out.shape[1])
        return y.index_add(0, handle.token, rows_out * handle.weight[:, None].to(rows_out.dtype))

    def experts(self, x, topk_ids, weights, w_up, w_down) -> torch.Tensor:
        """y[T,D] through the fused op, or dispatch -> mlp -> combine."""
        if self.mlp is None:
            return self.fused(x, topk_ids, weights, w_up, w_down)
        rows, offsets, handle = self.dispatch(x, topk_ids, weights)
        return self.combine(self.mlp(rows, offsets, w_up, w_down), handle)


class RdepDispatch:
    """Routed experts sharded over an expert-parallel group; rows move by direct writes (nmoe.rdep)."""

    def __init__(self, rdep, mlp: ExpertMLP = BF16_MLP):
        self.rdep = rdep  # nmoe.rdep.Rdep, shared by every MoE layer of the model
        self.mlp = mlp

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor):
        """x[T,D] -> (rows[M,D] for this rank's experts, offsets[El] int32, RdepHandle)."""
        return self.rdep.dispatch(x.to(self.rdep.config.dtype), topk_ids, weights)

    def combine(self, rows_out: torch.Tensor, handle) -> torch.Tensor:
        """rows_out[M,D] -> y[T,D] back in this rank's token order."""
        return self.rdep.combine(rows_out, handle)

    @torch.compiler.disable  # one host sync per dispatch (the received row count) keeps RDEP out of compiled graphs
    def experts(self, x, topk_ids, weights, w_up, w_down) -> torch.Tensor:
        """dispatch -> fused SwiGLU expert MLP on the received rows -> combine."""
        rows, offsets, handle = self.dispatch(x, topk_ids, weights)
        out = self.mlp(rows, offsets, w_up, w_down)
        return self.combine(out, handle).to(x.dtype)
