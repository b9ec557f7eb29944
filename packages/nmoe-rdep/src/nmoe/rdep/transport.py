"""Transports: where the symmetric buffers live and how the ranks' steps are driven.

A transport gives each rank symmetric tensors (same shape on every rank, allocated once) together
with a pointer table of every peer's copy, plus a way to run the ranks' step sequences. The RDEP
engine is written as generators that `yield` wherever a rank must wait for its peers; a real
rank runs its generator straight through (the waits are device-side spin kernels), while the
simulated world advances all ranks' generators in lockstep inside one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class SymmetricTensor:
    """This rank's copy of a symmetric buffer and the table of every rank's base address."""

    local: torch.Tensor
    peers: torch.Tensor  # [W] int64 base addresses, peers[rank] == local.data_ptr()
    aligned16: bool = False  # every base address is a multiple of 16 bytes (kernels may store 16 B at once)


class Transport(Protocol):
    """What `Rdep` needs from the world it runs in."""

    rank: int
    world: int
    device: torch.device

    def symmetric(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> SymmetricTensor:
        """Allocate (collectively, once) a zero-filled symmetric tensor."""

    def ready(self) -> None:
        """Return once every rank finished allocating and zeroing (initialisation only)."""

    def before_wait(self, flags: torch.Tensor, epoch: int) -> None:
        """Hook run before a device-side wait (the simulated world checks for deadlock here)."""

    def steps(self) -> contextlib.AbstractContextManager:
        """Context in which this rank's transport work is enqueued (its dedicated stream)."""


Steps = Generator[None, None, Any]


def run_straight(steps: Steps) -> Any:
    """Run one rank's steps to completion (each wait is a device-side spin)."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def run_lockstep(all_steps: Sequence[Steps]) -> list[Any]:
    """Advance every rank to its next wait point in turn until all ranks are done."""
    results: list[Any] = [None] * len(all_steps)
    pending = list(range(len(all_steps)))
    while pending:
        for index in list(pending):
            try:
                next(all_steps[index])
            except StopIteration as done:
                results[index] = done.value
                pending.remove(index)
    return results


class SimulatedTransport:
    """Rank `rank` of a SimulatedWorld: symmetric buffers are ordinary tensors in this process."""

    def __init__(self, world: SimulatedWorldBuffers, rank: int):
        self._buffers = world
        self.rank = rank
        self.world = world.world
        self.device = world.device

    def symmetric(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> SymmetricTensor:
        """Rank r's copy of buffer `name` (all W copies are allocated on first use)."""
        copies, table = self._buffers.get(name, tuple(shape), dtype)
        return SymmetricTensor(copies[self.rank], table, all(c.data_ptr() % 16 == 0 for c in copies))

    def ready(self) -> None:
        """Nothing to wait for: allocation is synchronous in one process."""

    def before_wait(self, flags: torch.Tensor, epoch: int) -> None:
        """Fail loud instead of spinning forever when a peer never signalled."""
        from nmoe.rdep.kernels import EPOCH_PERIOD

        accepted = (epoch, (epoch + 1) % EPOCH_PERIOD)  # what the device-side wait accepts
        behind = [peer for peer, value in enumerate(flags.tolist()) if value not in accepted]
        if behind:
            raise RuntimeError(
                f"simulated rank {self.rank} waits for epoch {epoch} but ranks {behind} never signalled it: "
                "every rank must run the same RDEP operations in the same order (use SimulatedWorld's "
                "*_all methods, which drive all ranks together)"
            )

    def steps(self) -> contextlib.AbstractContextManager:
        """No streams on the CPU."""
        return contextlib.nullcontext()


class SimulatedWorldBuffers:
    """The W copies of every symmetric buffer of a simulated world, keyed by name."""

    def __init__(self, world: int, device: torch.device):
        self.world = world
        self.device = device
        self._buffers: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(per-rank copies [W] of `shape`/`dtype`, their data pointers [W] int64), created once per name."""
        if name not in self._buffers:
            copies = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.world)]
            table = torch.tensor([c.data_ptr() for c in copies], dtype=torch.int64, device=self.device)
            self._buffers[name] = (copies, table)
        copies, table = self._buffers[name]
        if copies[0].shape != shape or copies[0].dtype != dtype:
            raise ValueError(
                f"symmetric buffer {name!r} was allocated as {tuple(copies[0].shape)} {copies[0].dtype} "
                f"but requested as {shape} {dtype}: every rank must use the same RdepConfig"
            )
        return copies, table

    def copies(self, name: str) -> list[torch.Tensor]:
        """All ranks' copies of buffer `name` (tests inspect them)."""
        return self._buffers[name][0]
