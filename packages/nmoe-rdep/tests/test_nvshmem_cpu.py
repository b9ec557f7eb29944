"""The single-process parts of the NVSHMEM transport, on the CPU (the GPU parts: gpu_multi.py)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nmoe.rdep import RdepConfig
from nmoe.rdep.nvshmem import (
    HEAP_ENV,
    NvshmemTransport,
    broadcast_bytes,
    ensure_heap_size,
    parse_bytes,
    require_same_allocation,
    required_heap_bytes,
)


def test_heap_covers_every_buffer_and_is_mib_aligned():
    cfg = RdepConfig(dim=2048, n_routed_experts=64, top_k=6, max_tokens_per_rank=4096, capacity_margin=2.0)
    need = required_heap_bytes(cfg, world=8)
    rows = cfg.receive_rows(8)
    assert rows == 4096 * 6 * 2
    buffers = (rows + 4096 * 6) * 2048 * 2 + rows * 4 + (2 * 8 * 64 + 8) * 4
    assert need >= buffers and need % (1 << 20) == 0 and need - buffers < (65 << 20)


def test_heap_env_is_set_kept_or_refused():
    env: dict[str, str] = {}
    ensure_heap_size(3 << 30, env)
    assert parse_bytes(env[HEAP_ENV]) == 3 << 30
    env = {HEAP_ENV: "4G"}
    ensure_heap_size(3 << 30, env)
    assert env[HEAP_ENV] == "4G"
    with pytest.raises(ValueError, match="NVSHMEM_SYMMETRIC_SIZE=512M is smaller"):
        ensure_heap_size(1 << 30, {HEAP_ENV: "512M"})
    assert parse_bytes("64k") == 65536 and parse_bytes("1.5G") == 3 << 29 and parse_bytes("1024") == 1024


def test_transport_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group first"):
        NvshmemTransport()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broadcast_worker(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        record = np.zeros(1, dtype=[("bytes", np.uint8, 16)]).view(np.recarray)  # like nvshmem's uniqueid
        if rank == 0:
            record.view(np.uint8)[:] = np.arange(16, dtype=np.uint8) + 7
        broadcast_bytes(record.view(np.uint8))
        results[rank] = bytes(record.view(np.uint8))
    finally:
        dist.destroy_process_group()


def test_unique_id_broadcast_reaches_every_rank_in_place():
    world = 3
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _broadcast_worker, args=(world, _free_port(), results), nprocs=world, join=True, start_method="fork"
        )  # fork: the worker lives in a test module
        assert [results[r] for r in range(world)] == [bytes(range(7, 23))] * world


def _allocation_worker(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        require_same_allocation("rdep.recv", (8, 4), torch.bfloat16)  # everyone agrees
        rows = 8 if rank != 2 else 9  # rank 2 was built from another config
        try:
            require_same_allocation("rdep.recv", (rows, 4), torch.bfloat16)
        except ValueError as err:
            results[rank] = str(err)
    finally:
        dist.destroy_process_group()


def test_symmetric_allocation_mismatch_raises_on_every_rank():
    world = 3
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _allocation_worker, args=(world, _free_port(), results), nprocs=world, join=True, start_method="fork"
        )
        assert sorted(results.keys()) == [0, 1, 2]
        assert all("rank 2: ('rdep.recv', (9, 4), 'torch.bfloat16')" in results[r] for r in range(world))
