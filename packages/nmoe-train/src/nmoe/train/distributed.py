"""The process world of a run: torch.distributed from torchrun's environment, and its process groups.

Layout (E routed experts, W ranks, expert-parallel size P, R = W / P replicas):
- world: every rank; the dense (non-expert) parameters are data-parallel over it;
- ep group of rank r: ranks [P * (r // P), P * (r // P) + P), which together hold one copy of the
  experts (rank r owns experts [E/P * (r % P), E/P * (r % P + 1))) and exchange tokens through RDEP;
- edp group of rank r: the R ranks with the same r % P, which hold the same experts and reduce
  their gradients.
With W = 1 nothing is initialised and every reduction is a no-op.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from nmoe.rdep.shm import process_gone
from nmoe.train.runtime import RunPlan, SetupError

T = TypeVar("T")
_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class PeerLost(RuntimeError):
    """A collective with the other ranks failed or timed out; the message names the ranks that are gone."""


@dataclass
class World:
    """This process's rank, its groups and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ep_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ep_group: Any = None  # ProcessGroup of this rank's expert-parallel world (None when W = 1)
    edp_group: Any = None  # ProcessGroup of the replicas of this rank's experts (None when there is one)
    backend: str = ""
    _peers: dict[int, tuple[str, int]] = field(default_factory=dict)  # rank -> (host, pid)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: prints, prepares data, writes the shared checkpoint files and the registry."""
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        """Position inside the expert-parallel group: which slice of the experts this rank owns."""
        return self.rank % self.ep_size

    @property
    def replica(self) -> int:
        """Which copy of the experts this rank belongs to."""
        return self.rank // self.ep_size

    def all_reduce_sum_(self, tensor: torch.Tensor, over: str = "world") -> torch.Tensor:
        """In-place sum over the world, this rank's `ep` group or its `edp` group; identity where that is one rank."""
        group = {"world": None, "ep": self.ep_group, "edp": self.edp_group}[over]
        if self.is_distributed and (over == "world" or group is not None):
            self._collective(lambda: dist.all_reduce(tensor, group=group))
        return tensor

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(out, obj))
        return out

    def barrier(self) -> None:
        if self.is_distributed:
            self._collective(lambda: dist.barrier())

    def agree(self, action: Callable[[], T], what: str) -> T:
        """Run `action` on every rank; if it raised on any rank, raise on every rank, naming who and why.

        Keeps a rank-local failure (its data shard, its checkpoint file, its disk) from leaving the other
        ranks waiting forever in their next collective. The error type of the lowest failing rank is kept
        when it can be rebuilt from a message.
        """
        result, failure = None, None
        try:
            result = action()
        except Exception as err:  # noqa: BLE001 - every failure is re-raised below, on every rank
            failure = err
        if not self.is_distributed:
            if failure is not None:
                raise failure
            return result  # type: ignore[return-value]
        verdicts = self.gather_objects(None if failure is None else (type(failure).__name__, str(failure)))
        failed = [(rank, v) for rank, v in enumerate(verdicts) if v is not None]
        if not failed:
            return result  # type: ignore[return-value]
        if failure is not None and failed[0][0] == self.rank:
            raise failure
        rank, (kind, message) = failed[0]
        others = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
        error_type = type(failure) if failure is not None and type(failure).__name__ == kind else RuntimeError
        try:
            raise error_type(f"rank {rank}{others} failed while {what}: {message}") from None
        except TypeError:
            raise RuntimeError(f"rank {rank}{others} failed while {what}: {message}") from None

    def lost_peers(self) -> list[int]:
        """Ranks on this host whose process no longer exists (used to name a dead peer)."""
        host = socket.gethostname()
        gone = []
        for rank, (peer_host, pid) in sorted(self._peers.items()):
            if rank != self.rank and peer_host == host and process_gone(pid):
                gone.append(rank)
        return gone

    def _collective(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (RuntimeError, dist.DistError) as err:
            raise self.peer_lost_error(err) from None

    def peer_lost_error(self, err: BaseException) -> PeerLost:
        """A PeerLost naming the dead ranks (when they can be found) for a failed cross-rank operation."""
        gone = self.lost_peers()
        who = f"rank(s) {gone} stopped (their process is gone)" if gone else "a peer rank stopped or stalled"
        return PeerLost(
            f"rank {self.rank}: {who}; the collective failed: {str(err).splitlines()[0][:300]}. Look at the "
            "first error of the other ranks, then rerun the same command to resume from the last checkpoint."
        )

    def close(self) -> None:
        """Wait for every rank, then tear down the process groups (gloo aborts a process that exits with them alive)."""
        self.barrier()
        shutdown()


def shutdown() -> None:
    """Destroy torch.distributed's process groups if this process has any; safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_world(plan: RunPlan, backend: str = "auto", timeout_s: float = 300.0, environ=os.environ) -> World:
    """The World of this process for `plan` (torch.distributed initialised from torchrun's environment)."""
    if plan.world_size == 1:
        return World(device=_device(plan, 0))
    missing = [v for v in _TORCHRUN_VARS if v not in environ]
    if missing:
        raise SetupError(
            f"WORLD_SIZE = {plan.world_size} but {', '.join(missing)} are not set: launch several processes with "
            "torchrun (`uv run torchrun --standalone --nproc_per_node=N -m nmoe.train CONFIG`), or unset WORLD_SIZE."
        )
    rank, local_rank = int(environ["RANK"]), int(environ["LOCAL_RANK"])
    device = _device(plan, local_rank)
    backend = _backend(plan, backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=plan.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    world = World(rank, plan.world_size, local_rank, plan.ep_size, device, backend=backend)
    world.ep_group, world.edp_group = _groups(plan)
    peers = world.gather_objects((socket.gethostname(), os.getpid()))
    world._peers = dict(enumerate(peers))
    return world


def _device(plan: RunPlan, local_rank: int) -> torch.device:
    if plan.device_type == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _backend(plan: RunPlan, backend: str, device: torch.device) -> str:
    if backend == "auto":
        shared_gpu = device.type == "cuda" and plan.world_size > torch.cuda.device_count()
        return "gloo" if device.type == "cpu" or shared_gpu else "nccl"
    if backend == "nccl" and device.type == "cuda" and plan.world_size > torch.cuda.device_count():
        raise SetupError(
            f"{plan.world_size} ranks on {torch.cuda.device_count()} GPU(s): NCCL refuses two ranks on one GPU. "
            "Set parallel.backend = 'gloo' (or 'auto') to share GPUs, or launch one rank per GPU."
        )
    return backend


def _groups(plan: RunPlan) -> tuple[Any, Any]:
    """(ep group, edp group) of this rank; every rank creates every group in the same order."""
    ep, world = plan.ep_size, plan.world_size
    rank = dist.get_rank()
    ep_group = edp_group = None
    for replica in range(world // ep):
        ranks = list(range(replica * ep, (replica + 1) * ep))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    if world // ep > 1:
        for ep_rank in range(ep):
            ranks = list(range(ep_rank, world, ep))
            group = dist.new_group(ranks)
            if rank in ranks:
                edp_group = group
    return ep_group, edp_group
