"""Test helpers: prove that no torch.distributed collective runs on the expert path.

`with forbid_collectives(): ...` replaces every torch.distributed collective (module functions, the
functional collectives and the ProcessGroup methods) by a function that raises CollectiveCalled, for the
duration of the block; RDEP's dispatch, combine and their backwards must run inside it unchanged.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist

COLLECTIVES = (
    "all_to_all",
    "all_to_all_single",
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "monitored_barrier",
)
FUNCTIONAL = (
    "all_to_all_single",
    "all_to_all_single_autograd",
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather_tensor",
    "all_gather_tensor_autograd",
    "reduce_scatter_tensor",
    "reduce_scatter_tensor_autograd",
    "broadcast",
)
PROCESS_GROUP_METHODS = (
    "allreduce",
    "allgather",
    "_allgather_base",
    "allgather_into_tensor_coalesced",
    "alltoall",
    "alltoall_base",
    "broadcast",
    "barrier",
    "reduce_scatter",
    "_reduce_scatter_base",
    "send",
    "recv",
    "gather",
    "scatter",
)


class CollectiveCalled(AssertionError):
    pass


@contextlib.contextmanager
def forbid_collectives():
    """Make every torch.distributed collective (module functions and ProcessGroup methods) raise."""
    patched: list[tuple[object, str, object]] = []

    def forbid(owner, name):
        original = vars(owner).get(name)  # the raw attribute: a class's restored method must stay unbound
        if original is None:
            return

        def refuse(*args, **kwargs):
            raise CollectiveCalled(f"torch.distributed {name} called on the RDEP expert path")

        try:
            setattr(owner, name, refuse)
        except (AttributeError, TypeError):
            return
        patched.append((owner, name, original))

    import torch.distributed._functional_collectives as funcol
    import torch.distributed.distributed_c10d as c10d
    import torch.distributed.nn.functional as dist_nn

    for name in COLLECTIVES:
        for owner in (dist, c10d, dist_nn):
            forbid(owner, name)
    for name in FUNCTIONAL:
        forbid(funcol, name)
    for name in PROCESS_GROUP_METHODS:
        forbid(dist.ProcessGroup, name)
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
