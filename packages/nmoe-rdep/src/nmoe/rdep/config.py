"""RdepConfig: everything that sizes the symmetric buffers, fixed for the life of an `Rdep`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class RdepCapacityError(RuntimeError):
    """A receive buffer would overflow; the message names the sizes and the config key to raise."""


class RdepTimeoutError(RuntimeError):
    """A device-side wait gave up on a peer (crashed, raised alone, or out of step): the world is broken."""


@dataclass(frozen=True)
class RdepConfig:
    """Sizes of one expert-parallel MoE transport (shared by every MoE layer that uses it).

    dim: D, the width of the rows moved. n_routed_experts: E, sharded evenly over the world.
    top_k: K. max_tokens_per_rank: the largest T any rank passes to `dispatch`.
    capacity_margin: each owner's receive buffer holds ceil(max_tokens_per_rank * top_k *
      capacity_margin) rows; a step that routes more rows to one owner raises RdepCapacityError
      (a margin >= world can never overflow).
    expert_capacity: when the caller drops routing slots past a per-expert capacity before dispatch
      (topk id -1, see nmoe.kernels.drop_over_capacity), the most rows one source sends to one expert;
      sizes the receive buffer exactly (W * E/W * expert_capacity rows) instead of by the margin.
    dtype: element type of the rows moved (x, expert outputs and their gradients).
    wait_timeout_s: a wait for peers gives up after this long and the next host sync of the Rdep
      raises RdepTimeoutError instead of hanging forever.
    """

    dim: int
    n_routed_experts: int
    top_k: int
    max_tokens_per_rank: int
    capacity_margin: float = 2.0
    expert_capacity: int | None = None
    dtype: torch.dtype = torch.bfloat16
    wait_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for key in ("dim", "n_routed_experts", "top_k", "max_tokens_per_rank"):
            if getattr(self, key) < 1:
                raise ValueError(f"RdepConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.top_k > self.n_routed_experts:
            raise ValueError(f"RdepConfig.top_k={self.top_k} exceeds n_routed_experts={self.n_routed_experts}")
        if self.capacity_margin <= 0:
            raise ValueError(f"RdepConfig.capacity_margin must be > 0, got {self.capacity_margin}")
        if not 0 < self.wait_timeout_s <= 86400:
            raise ValueError(f"RdepConfig.wait_timeout_s must be in (0, 86400], got {self.wait_timeout_s}")
        if self.expert_capacity is not None and self.expert_capacity < 1:
            raise ValueError(f"RdepConfig.expert_capacity must be >= 1 or None, got {self.expert_capacity}")

    def experts_per_rank(self, world: int) -> int:
        """E // world; raises ValueError naming both numbers when E is not divisible by world."""
        if world < 1 or self.n_routed_experts % world != 0:
            raise ValueError(
                f"n_routed_experts={self.n_routed_experts} is not divisible by the expert-parallel world "
                f"size {world}: RDEP shards experts evenly, so choose a world size that divides it "
                f"(or change model.n_routed_experts)."
            )
        return self.n_routed_experts // world

    def receive_rows(self, world: int) -> int:
        """Rows of each owner's receive buffer."""
        everything = world * self.max_tokens_per_rank * self.top_k
        if self.expert_capacity is not None:
            return min(everything, world * self.experts_per_rank(world) * self.expert_capacity)
        return min(everything, math.ceil(self.max_tokens_per_rank * self.top_k * self.capacity_margin))

    def return_rows(self) -> int:
        """Rows of each source's return buffer: one per (token, k) slot."""
        return self.max_tokens_per_rank * self.top_k

    def symmetric_bytes(self, world: int) -> int:
        """Bytes of symmetric memory one rank allocates (receive + return + metadata + counts + flags)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        rows = self.receive_rows(world)
        return (
            (rows + self.return_rows()) * self.dim * elem + rows * 4 + (2 * world * self.n_routed_experts + world) * 4
        )
