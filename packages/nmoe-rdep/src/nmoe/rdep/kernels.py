"""Triton kernels that move rows and raise flags through peer pointers.

Every kernel takes the peers' symmetric buffers as a pointer table: an int64 tensor [W] of base
addresses (device addresses mapped through NVSHMEM on the GPU; CPU addresses of ordinary tensors in
the simulated world). CPU launches run the very same kernel source through Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


class _Kernel:
    """One kernel source, compiled for CUDA tensors and interpreted for CPU tensors."""

    def __init__(self, fn, do_not_specialize: tuple[str, ...] = ()):
        self.fn = fn
        self.options = {"do_not_specialize": list(do_not_specialize)}  # values that change every call
        self.jit = triton.jit(fn, **self.options)

    @functools.cached_property
    def interpreted(self):
        if isinstance(self.jit, InterpretedFunction):
            return self.jit
        return InterpretedFunction(self.fn, **self.options)

    def on(self, device: torch.device):
        return self.interpreted if device.type == "cpu" else self.jit


EPOCH_PERIOD = 1 << 30  # flags hold epoch % EPOCH_PERIOD (even: the parity of the counts area survives the wrap)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(dim), 4096)


def _rows_aligned(aligned_table: bool, dim: int, dtype: torch.dtype) -> bool:
    """Every row of every peer buffer starts on 16 bytes: peer stores may be 16-byte vectors."""
    return aligned_table and dim * torch.empty((), dtype=dtype).element_size() % 16 == 0


def _scatter_rows(
    x_ptr,
    scale_ptr,
    dest_rank_ptr,
    dest_slot_ptr,
    buf_table,
    tag_table,
    x_stride,
    dim,
    tag_base,
    TOP_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WRITE_TAG: tl.constexpr,
    ACC: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # Program (t, d-block): read token t's row once, store it (times scale[t,k]) into each of its
    # K destinations' receive buffers; block 0 also writes the row's tag (source, t*K+k).
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = cols < dim
    row = tl.load(x_ptr + t * x_stride + cols, mask=in_row)
    for k in tl.static_range(TOP_K):
        i = t * TOP_K + k
        slot = tl.load(dest_slot_ptr + i)
        if slot >= 0:
            dest = tl.load(dest_rank_ptr + i)
            buf = tl.load(buf_table + dest).to(tl.pointer_type(x_ptr.dtype.element_ty))
            value = row
            if HAS_SCALE:
                value = (row.to(ACC) * tl.load(scale_ptr + i).to(ACC)).to(x_ptr.dtype.element_ty)
            dst = buf + slot.to(tl.int64) * dim + cols
            if ALIGNED:  # a pointer loaded from the table has no known alignment: 2-byte stores otherwise
                dst = tl.multiple_of(dst, 16)
            tl.store(dst, value, mask=in_row)
            if WRITE_TAG:
                if block == 0:
                    tags = tl.load(tag_table + dest).to(tl.pointer_type(tl.int32))
                    tl.store(tags + slot, (tag_base + i).to(tl.int32))


def _return_rows(
    y_ptr, tag_ptr, ret_table, y_stride, dim, slots_per_rank, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr
):
    # Program (m, d-block): received row m goes back to its source's return buffer at slot t*K+k.
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = cols < dim
    tag = tl.load(tag_ptr + m)
    source = tag // slots_per_rank
    slot = (tag % slots_per_rank).to(tl.int64)
    ret = tl.load(ret_table + source).to(tl.pointer_type(y_ptr.dtype.element_ty))
    dst = ret + slot * dim + cols
    if ALIGNED:
        dst = tl.multiple_of(dst, 16)
    tl.store(dst, tl.load(y_ptr + m * y_stride + cols, mask=in_row), mask=in_row)


def _sum_slots(
    ret_ptr,
    weight_ptr,
    dest_slot_ptr,
    out_ptr,
    dim,
    TOP_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
):
    # Program (t, d-block): out[t] = sum_k weight[t,k] * ret[t*K+k] over the slots that were sent.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = cols < dim
    acc = tl.full([BLOCK_D], 0.0, ACC)  # tl.full, not the jit-defined tl.zeros: see _Kernel
    for k in tl.static_range(TOP_K):
        i = t * TOP_K + k
        width = tl.where(tl.load(dest_slot_ptr + i) >= 0, dim, 0)  # 0: dropped slot, read nothing
        row = tl.load(ret_ptr + i * dim + cols, mask=cols < width, other=0.0).to(ACC)
        if HAS_WEIGHT:
            row = row * tl.load(weight_ptr + i).to(ACC)
        acc += row
    tl.store(out_ptr + t * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=in_row)


def _signal(
    counts_ptr,
    counts_table,
    flag_table,
    src_rank,
    epoch,
    counts_offset,
    n_experts,
    HAS_COUNTS: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Program `dest`: optionally put this source's counts row into dest's counts area, then raise
    # dest's flag[src_rank] to `epoch` with release semantics (orders every earlier write).
    dest = tl.program_id(0)
    if HAS_COUNTS:
        cols = tl.arange(0, BLOCK_E)
        area = tl.load(counts_table + dest).to(tl.pointer_type(tl.int32))
        counts = tl.load(counts_ptr + cols, mask=cols < n_experts)
        tl.store(area + counts_offset + src_rank * n_experts + cols, counts, mask=cols < n_experts)
        tl.debug_barrier()
    flags = tl.load(flag_table + dest).to(tl.pointer_type(tl.int32))
    tl.atomic_xchg(flags + src_rank, epoch, sem="release", scope="sys")


def _wait(flag_ptr, status_ptr, epoch, world, timeout, PERIOD: tl.constexpr, ON_GPU: tl.constexpr):
    # One program: spin until every peer's flag shows `epoch` or the one after it (mod PERIOD; a
    # peer is never further ahead, see Rdep._signal_all), acquiring at system scope so the rows
    # the peer stored before its release are visible to every later kernel of this stream.
    # Gives up after `timeout` (ns of %globaltimer on the GPU, polls in the interpreter) and then
    # records (late peers, epoch, a late peer, its flag) in status[4] for the host to raise on.
    after = (epoch + 1) % PERIOD
    if ON_GPU:
        start = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    else:
        start = 0
    n_late = 0
    late_peer = -1
    late_seen = 0
    for peer in range(world):
        seen = tl.atomic_add(flag_ptr + peer, 0, sem="acquire", scope="sys")
        elapsed = start - start
        while ((seen != epoch) & (seen != after)) & (elapsed <= timeout):
            seen = tl.atomic_add(flag_ptr + peer, 0, sem="acquire", scope="sys")
            if ON_GPU:
                elapsed = (
                    tl.inline_asm_elementwise(
                        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
                    )
                    - start
                )
            else:
                elapsed = elapsed + 1
        late = (seen != epoch) & (seen != after)
        n_late += late.to(tl.int32)
        late_peer = tl.where(late, peer, late_peer)
        late_seen = tl.where(late, seen, late_seen)
    if n_late > 0:
        tl.store(status_ptr + 0, n_late)
        tl.store(status_ptr + 1, epoch)
        tl.store(status_ptr + 2, late_peer)
        tl.store(status_ptr + 3, late_seen)


scatter_rows_kernel = _Kernel(_scatter_rows, do_not_specialize=("tag_base",))
return_rows_kernel = _Kernel(_return_rows)
sum_slots_kernel = _Kernel(_sum_slots)
signal_kernel = _Kernel(_signal, do_not_specialize=("src_rank", "epoch", "counts_offset"))
wait_kernel = _Kernel(_wait, do_not_specialize=("epoch", "timeout"))


def scatter_rows(
    x: torch.Tensor,
    dest_rank: torch.Tensor,
    dest_slot: torch.Tensor,
    buf_table: torch.Tensor,
    scale: torch.Tensor | None = None,
    tag_table: torch.Tensor | None = None,
    tag_base: int = 0,
    aligned_table: bool = False,
) -> None:
    """x[T,D] -> peers' buffers: row (t,k) = x[t] (* scale[t,k]) at dest_slot[t*K+k] of dest_rank's buffer."""
    n_tokens, dim = x.shape
    top_k = dest_slot.numel() // max(n_tokens, 1)
    if n_tokens == 0:
        return
    block = _block_d(dim)
    scatter_rows_kernel.on(x.device)[(n_tokens, triton.cdiv(dim, block))](
        x,
        scale if scale is not None else x,
        dest_rank,
        dest_slot,
        buf_table,
        tag_table if tag_table is not None else buf_table,
        x.stride(0),
        dim,
        tag_base,
        TOP_K=top_k,
        BLOCK_D=block,
        HAS_SCALE=scale is not None,
        WRITE_TAG=tag_table is not None,
        ACC=_acc_dtype(x.dtype),
        ALIGNED=_rows_aligned(aligned_table, dim, x.dtype),
    )


def return_rows(
    y: torch.Tensor, tags: torch.Tensor, ret_table: torch.Tensor, slots_per_rank: int, aligned_table: bool = False
) -> None:
    """y[M,D] -> sources' return buffers: row m to source tags[m] // R, slot tags[m] % R."""
    n_rows, dim = y.shape
    if n_rows == 0:
        return
    block = _block_d(dim)
    return_rows_kernel.on(y.device)[(n_rows, triton.cdiv(dim, block))](
        y,
        tags,
        ret_table,
        y.stride(0),
        dim,
        slots_per_rank,
        BLOCK_D=block,
        ALIGNED=_rows_aligned(aligned_table, dim, y.dtype),
    )


def sum_slots(
    ret: torch.Tensor,
    dest_slot: torch.Tensor,
    n_tokens: int,
    out_dtype: torch.dtype,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """ret[>=T*K, D] -> out[T,D] = sum_k weight[t,k] * ret[t*K+k] over sent slots (weight 1 if None)."""
    dim = ret.shape[1]
    out = torch.empty(n_tokens, dim, dtype=out_dtype, device=ret.device)
    if n_tokens == 0:
        return out
    top_k = dest_slot.numel() // n_tokens
    block = _block_d(dim)
    sum_slots_kernel.on(ret.device)[(n_tokens, triton.cdiv(dim, block))](
        ret,
        weight if weight is not None else ret,
        dest_slot,
        out,
        dim,
        TOP_K=top_k,
        BLOCK_D=block,
        HAS_WEIGHT=weight is not None,
        ACC=_acc_dtype(out_dtype),
    )
    return out


def signal(
    flag_table: torch.Tensor,
    src_rank: int,
    epoch: int,
    counts: torch.Tensor | None = None,
    counts_table: torch.Tensor | None = None,
    counts_offset: int = 0,
) -> None:
    """Raise flag[src_rank] to epoch on every peer, after putting counts[E] into their counts area."""
    world = flag_table.numel()
    n_experts = counts.numel() if counts is not None else 1
    signal_kernel.on(flag_table.device)[(world,)](
        counts if counts is not None else flag_table,
        counts_table if counts_table is not None else flag_table,
        flag_table,
        src_rank,
        epoch,
        counts_offset,
        n_experts,
        HAS_COUNTS=counts is not None,
        BLOCK_E=triton.next_power_of_2(n_experts),
    )


def wait(flags: torch.Tensor, epoch: int, status: torch.Tensor, timeout_s: float, polls: int = 1000) -> None:
    """Block the stream until every entry of the local flags[W] int32 shows epoch or epoch + 1 (mod
    EPOCH_PERIOD); past timeout_s (GPU) or `polls` polls (interpreter) give up and fill status[4] int32."""
    on_gpu = flags.device.type != "cpu"
    timeout = int(timeout_s * 1e9) if on_gpu else polls
    wait_kernel.on(flags.device)[(1,)](flags, status, epoch, flags.numel(), timeout, PERIOD=EPOCH_PERIOD, ON_GPU=on_gpu)
