"""NVSHMEM transport: symmetric buffers from nvshmem4py, peer pointers for the Triton kernels.

Initialised from torch.distributed by broadcasting an NVSHMEM unique id (the only use of a
torch.distributed collective, at construction, never on the expert path). Needs the optional
extra: `pip install 'nmoe-rdep[nvshmem]'` (nvshmem4py-cu13) and all ranks on one NVLink domain.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from nmoe.rdep.config import RdepConfig
from nmoe.rdep.transport import SymmetricTensor
from nmoe.rdep.world import broadcast_bytes, require_same_allocation

HEAP_ENV = "NVSHMEM_SYMMETRIC_SIZE"
HEAP_SLACK_BYTES = 64 << 20  # per-allocation alignment and NVSHMEM's own bookkeeping


def required_heap_bytes(config: RdepConfig, world: int) -> int:
    """Symmetric heap one rank needs for one Rdep of `config` (rounded up to MiB, with slack)."""
    need = config.symmetric_bytes(world) + HEAP_SLACK_BYTES
    return -(-need // (1 << 20)) << 20


def parse_bytes(text: str) -> int:
    """'2147483648', '2G', '512M', '64K' -> bytes (NVSHMEM's size syntax, binary units)."""
    text = text.strip().upper().removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def ensure_heap_size(required: int, environ: dict | None = None) -> None:
    """Set NVSHMEM_SYMMETRIC_SIZE to `required` unless it is already at least that; else raise."""
    environ = os.environ if environ is None else environ
    current = environ.get(HEAP_ENV)
    if current is None:
        environ[HEAP_ENV] = str(required)
    elif parse_bytes(current) < required:
        raise ValueError(
            f"{HEAP_ENV}={current} is smaller than the {required} bytes RDEP's symmetric buffers need "
            f"(RdepConfig.symmetric_bytes plus slack): unset it or raise it"
        )


def _import_nvshmem():
    try:
        import nvshmem.core as nvshmem
    except ImportError as err:
        raise ImportError(
            "NvshmemTransport needs nvshmem4py: install the extra `nmoe-rdep[nvshmem]` (nvshmem4py-cu13)"
        ) from err
    return nvshmem


def _cuda_device(index: int):
    try:
        from cuda.core import Device
    except ImportError:
        from cuda.core.experimental import Device
    return Device(index)


_INITIALISED = False  # NVSHMEM is initialised once per process; its heap size is fixed then


class NvshmemTransport:
    """One GPU rank: NVSHMEM symmetric tensors, peer pointers, a dedicated transport stream.

    Create one per process and share it among every Rdep (size it with `for_config(*configs)`).
    """

    def __init__(self, heap_bytes: int | None = None, group: dist.ProcessGroup | None = None):
        global _INITIALISED
        if _INITIALISED:
            raise RuntimeError(
                "NVSHMEM is already initialised in this process: create one NvshmemTransport and share it "
                "among Rdep instances (NvshmemTransport.for_config(*configs) sizes the heap for all of them)"
            )
        if not dist.is_initialized():
            raise RuntimeError("NvshmemTransport: call torch.distributed.init_process_group first")
        if not torch.cuda.is_available():
            raise RuntimeError("NvshmemTransport needs CUDA; on the CPU use SimulatedWorld")
        self._nvshmem = _import_nvshmem()
        self._group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        if heap_bytes is not None:
            ensure_heap_size(heap_bytes)
        uid = self._nvshmem.get_unique_id(empty=self.rank != 0)
        broadcast_bytes(uid._data.view(np.uint8), group)
        self._nvshmem.init(
            device=_cuda_device(self.device.index), uid=uid, rank=self.rank, nranks=self.world, initializer_method="uid"
        )
        _INITIALISED = True
        if self._nvshmem.my_pe() != self.rank or self._nvshmem.n_pes() != self.world:
            raise RuntimeError(
                f"NVSHMEM PE {self._nvshmem.my_pe()}/{self._nvshmem.n_pes()} does not match torch.distributed "
                f"rank {self.rank}/{self.world}"
            )
        self._stream = torch.cuda.Stream(self.device)
        self._tensors: list[torch.Tensor] = []

    @classmethod
    def for_config(cls, *configs: RdepConfig, group: dist.ProcessGroup | None = None) -> NvshmemTransport:
        """A transport whose symmetric heap fits one Rdep of each config over the group's world size."""
        world = dist.get_world_size(group)
        return cls(heap_bytes=sum(required_heap_bytes(c, world) for c in configs), group=group)

    def symmetric(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> SymmetricTensor:
        """Collectively allocate a zero-filled symmetric tensor and the table of peers' addresses."""
        require_same_allocation(name, tuple(shape), dtype, self._group)
        local = self._nvshmem.tensor(tuple(shape), dtype=dtype)
        local.zero_()
        self._tensors.append(local)
        addresses = [
            local.data_ptr() if p == self.rank else self._peer_address(local, p, name) for p in range(self.world)
        ]
        table = torch.tensor(addresses, dtype=torch.int64, device=self.device)
        return SymmetricTensor(local, table, all(address % 16 == 0 for address in addresses))

    def _peer_address(self, local: torch.Tensor, peer: int, name: str) -> int:
        try:
            address = self._nvshmem.get_peer_tensor(local, peer).data_ptr()
        except Exception as err:  # nvshmem raises its own error types
            address, cause = 0, err
        else:
            cause = None
        if address == 0:
            raise RuntimeError(
                f"rank {self.rank} cannot map {name!r} of peer {peer} (nvshmem_ptr gave no address): RDEP's "
                "peer-pointer kernels need every rank on one NVLink/P2P domain"
            ) from cause
        return address

    def peer_view(self, tensor: torch.Tensor, peer: int) -> torch.Tensor:
        """`tensor` (a symmetric tensor of this transport) as mapped from `peer`'s copy: loads and stores go there."""
        return self._nvshmem.get_peer_tensor(tensor, peer)

    def ready(self) -> None:
        """Every rank zeroed its buffers before anyone may signal (initialisation only)."""
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self._group)

    def before_wait(self, flags: torch.Tensor, epoch: int) -> None:
        """Nothing: the wait is a device-side spin."""

    @contextlib.contextmanager
    def steps(self) -> Iterator[None]:
        """Enqueue RDEP work on the dedicated stream, ordered after and before the caller's stream."""
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:
            caller.wait_stream(self._stream)

    def close(self) -> None:
        """Collectively free the symmetric tensors and finalize NVSHMEM (no Rdep may be used after)."""
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self._group)
        for tensor in reversed(self._tensors):
            self._nvshmem.free_tensor(tensor)
        self._tensors.clear()
        self._nvshmem.finalize()
        global _INITIALISED
        _INITIALISED = False
