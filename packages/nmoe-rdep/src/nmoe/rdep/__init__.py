"""nmoe.rdep: expert-parallel dispatch/combine by direct writes into peers' symmetric buffers.

`Rdep(config, transport).dispatch(x, topk_ids, topk_weights) -> (expert_x, expert_offsets, handle)`
and `.combine(expert_y, handle) -> y`, both autograd-aware, no collective on the expert path.
Transports: `SimulatedWorld` (W ranks in one process, CPU tests), `ShmTransport` (CPU processes of one
host, shared-memory files) and `NvshmemTransport` (GPUs of one node).
"""

from nmoe.rdep.config import RdepCapacityError, RdepConfig, RdepTimeoutError
from nmoe.rdep.rdep import Rdep, RdepHandle, SimulatedWorld
from nmoe.rdep.shm import ShmTransport
from nmoe.rdep.transport import SymmetricTensor, Transport

__all__ = [
    "Rdep",
    "RdepConfig",
    "RdepCapacityError",
    "RdepTimeoutError",
    "RdepHandle",
    "SimulatedWorld",
    "ShmTransport",
    "SymmetricTensor",
    "Transport",
    "NvshmemTransport",
]


def __getattr__(name: str):
    # Imported lazily: the NVSHMEM transport needs CUDA and the optional nvshmem4py extra.
    if name == "NvshmemTransport":
        from nmoe.rdep.nvshmem import NvshmemTransport

        return NvshmemTransport
    raise AttributeError(f"module 'nmoe.rdep' has no attribute {name!r}")
