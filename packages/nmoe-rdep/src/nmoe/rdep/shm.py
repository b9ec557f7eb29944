"""Shared-memory transport: RDEP between CPU processes of one host, a faithful stand-in for symmetric memory.

Each rank's symmetric buffer is a file in /dev/shm that every rank of the group maps into its own
address space; the pointer table holds this process's address of every peer's mapping, so the same
Triton kernels (run by Triton's interpreter on CPU tensors) store rows straight into the peer's buffer
and raise its flags, exactly as on GPUs over NVLink. No collective runs on the expert path:
torch.distributed is used at construction only (agree on names, barrier). A wait spins on the local
flags until every peer signalled, and raises RdepTimeoutError naming the late peer after the timeout,
or at once when the peer's process is gone. The files are unlinked as soon as every rank mapped them,
so a killed job leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import time
import uuid

import torch
import torch.distributed as dist

from nmoe.rdep.config import RdepConfig, RdepTimeoutError
from nmoe.rdep.transport import SymmetricTensor
from nmoe.rdep.world import require_same_allocation

SHM_DIR = "/dev/shm"


class ShmTransport:
    """One CPU rank of an expert-parallel group on one host (create one per process; share it among Rdeps)."""

    def __init__(self, group: dist.ProcessGroup | None = None, wait_timeout_s: float = 600.0):
        if not dist.is_initialized():
            raise RuntimeError("ShmTransport: call torch.distributed.init_process_group first (gloo)")
        if not os.path.isdir(SHM_DIR):
            raise RuntimeError(f"ShmTransport needs {SHM_DIR} (a Linux tmpfs); this machine has none")
        self._group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = torch.device("cpu")
        self.wait_timeout_s = wait_timeout_s
        here = (uuid.uuid4().hex[:12], socket.gethostname(), os.getpid())
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, here, group=group)
        hosts = {host for _, host, _ in everyone}
        if len(hosts) > 1:
            raise RuntimeError(f"ShmTransport maps host memory: every rank must run on one host, got {sorted(hosts)}")
        self._job = everyone[0][0]
        self._pids = [pid for _, _, pid in everyone]
        self._maps: list[mmap.mmap] = []

    @classmethod
    def for_config(cls, *configs: RdepConfig, group: dist.ProcessGroup | None = None) -> ShmTransport:
        """A transport whose waits give up after the longest wait_timeout_s of the configs."""
        return cls(group=group, wait_timeout_s=max(c.wait_timeout_s for c in configs))

    def symmetric(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> SymmetricTensor:
        """Collectively create a zero-filled shared buffer per rank and map every rank's copy here."""
        require_same_allocation(name, tuple(shape), dtype, self._group)
        numel = 1
        for n in shape:
            numel *= n
        nbytes = max(numel * torch.empty((), dtype=dtype).element_size(), 1)
        mine = self._path(name, self.rank)
        fd = os.open(mine, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)  # a new file reads as zeros
        finally:
            os.close(fd)
        dist.barrier(group=self._group)
        views = [self._map(self._path(name, peer), nbytes, dtype, numel, shape) for peer in range(self.world)]
        dist.barrier(group=self._group)
        os.unlink(mine)  # every rank holds a mapping now; nothing outlives the job
        table = torch.tensor([v.data_ptr() for v in views], dtype=torch.int64)
        return SymmetricTensor(views[self.rank], table, all(v.data_ptr() % 16 == 0 for v in views))

    def _path(self, name: str, rank: int) -> str:
        return os.path.join(SHM_DIR, f"nmoe-rdep-{self._job}-{name}-{rank}")

    def _map(self, path: str, nbytes: int, dtype: torch.dtype, numel: int, shape) -> torch.Tensor:
        fd = os.open(path, os.O_RDWR)
        try:
            mapped = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._maps.append(mapped)
        return torch.frombuffer(mapped, dtype=dtype, count=numel).view(shape)

    def ready(self) -> None:
        """Every rank created and mapped its buffers (initialisation only)."""
        dist.barrier(group=self._group)

    def before_wait(self, flags: torch.Tensor, epoch: int) -> None:
        """Spin on the local flags until every peer signalled `epoch` (or the next one); raise naming a late peer."""
        from nmoe.rdep.kernels import EPOCH_PERIOD

        accepted = (epoch, (epoch + 1) % EPOCH_PERIOD)
        deadline = time.monotonic() + self.wait_timeout_s
        pause = 0.0
        while True:
            late = [(peer, v) for peer, v in enumerate(flags.tolist()) if v not in accepted]
            if not late:
                return
            gone = [peer for peer, _ in late if process_gone(self._pids[peer])]
            if gone or time.monotonic() > deadline:
                peer, seen = late[0]
                why = (
                    f"rank(s) {gone} of this expert-parallel group stopped (process gone)"
                    if gone
                    else (
                        f"rank {peer} did not signal within RdepConfig.wait_timeout_s={self.wait_timeout_s} s (its flag "
                        f"shows {seen})"
                    )
                )
                raise RdepTimeoutError(
                    f"RDEP rank {self.rank} waits for epoch {epoch}: {why}. A peer crashed, raised alone or ran RDEP "
                    "operations in a different order; the buffers of this group are no longer consistent: restart "
                    "the job (it resumes from the last checkpoint)."
                )
            time.sleep(pause)
            pause = min(0.001, pause + 1e-5)

    def steps(self) -> contextlib.AbstractContextManager:
        """No streams on the CPU."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Drop this rank's mappings (tensors made from them must not be used afterwards)."""
        self._maps.clear()


def process_gone(pid: int) -> bool:
    """Whether process `pid` of this host has ended (a killed process nobody reaped yet, a zombie, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False
