"""Triton kernels. Imported only on the GPU path (or by tests under TRITON_INTERPRET=1)."""

from __future__ import annotations

import triton
import triton.language as tl

EPILOGUE_STORE = 0  # C = A @ B
EPILOGUE_SWIGLU = 1  # H = A @ [Bg | Bu] stored, C = silu(Hg) * Hu
EPILOGUE_SWIGLU_BWD = 2  # G = A @ B; dA = w * G; dw += <G, a>; C = [dHg | dHu]


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b; UPCAST (interpreter only, whose bf16 dot is wrong) multiplies in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _locate_tile(pid_m, offsets_ptr, M, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Map a row-tile index to (expert, first row, end row); tiles past the groups cover rows >= offsets[-1]."""
    e_idx = tl.arange(0, BLOCK_E)
    valid = e_idx < E
    ends = tl.load(offsets_ptr + e_idx, mask=valid, other=0)
    starts = tl.load(offsets_ptr + e_idx - 1, mask=valid & (e_idx > 0), other=0)
    tiles = tl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    cum = tl.cumsum(tiles, 0)
    expert = tl.sum((cum <= pid_m).to(tl.int32), 0)
    is_tail = expert >= E
    here = e_idx == expert
    first_tile = tl.where(is_tail, tl.sum(tiles, 0), tl.sum(tl.where(here, cum - tiles, 0), 0))
    last_end = tl.sum(tl.where(e_idx == E - 1, ends, 0), 0)
    start = tl.where(is_tail, last_end, tl.sum(tl.where(here, starts, 0), 0))
    end = tl.where(is_tail, M, tl.sum(tl.where(here, ends, 0), 0))
    return expert, start + (pid_m - first_tile) * BLOCK_M, end, is_tail


@triton.jit
def gmm_kernel(
    a_ptr,
    a_idx_ptr,
    b_ptr,
    c_ptr,
    h_ptr,
    w_ptr,
    w_idx_ptr,
    dw_ptr,
    offsets_ptr,
    M,
    N,
    K,
    E,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_hm,
    GATHER_A: tl.constexpr,
    EPILOGUE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Grouped C[rows of e] = A[rows] @ B[e] with an optional row gather of A and a fused epilogue.

    EPILOGUE_SWIGLU: B has 2N columns (gate | up); H[:, :N], H[:, N:] get gate/up, C gets silu(gate)*up.
    EPILOGUE_SWIGLU_BWD: A @ B is dL/d(act) before the routing weight w[w_idx[row]]; H holds the forward
    gate/up; C gets d(gate) | d(up) (2N columns) and dw[w_idx[row]] accumulates <A @ B, act>.
    """
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    expert, row0, end, is_tail = _locate_tile(pid_m, offsets_ptr, M, E, BLOCK_M, BLOCK_E)
    if row0 >= end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    rows64 = rows.to(tl.int64)
    if GATHER_A:
        a_rows = tl.load(a_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = rows64
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(is_tail, 0, K)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST)
        if EPILOGUE == 1:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = _dot(a, b_up, acc_up, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_ok = row_ok[:, None] & col_ok[None, :]
    c_ptrs = c_ptr + rows64[:, None] * stride_cm + cols[None, :]
    out_ty = c_ptr.dtype.element_ty
    if EPILOGUE == 0:
        tl.store(c_ptrs, acc.to(out_ty), mask=out_ok)
    elif EPILOGUE == 1:
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
        gate = acc.to(out_ty)
        up = acc_up.to(out_ty)
        tl.store(h_ptrs, gate, mask=out_ok)
        tl.store(h_ptrs + N, up, mask=out_ok)
        gate32 = gate.to(tl.float32)
        act = gate32 * tl.sigmoid(gate32) * up.to(tl.float32)
        tl.store(c_ptrs, act.to(out_ty), mask=out_ok)
    else:
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
        gate = tl.load(h_ptrs, mask=out_ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptrs + N, mask=out_ok, other=0.0).to(tl.float32)
        w_idx = tl.load(w_idx_ptr + rows, mask=row_ok, other=0)
        w = tl.load(w_ptr + w_idx, mask=row_ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        tl.atomic_add(dw_ptr + w_idx, tl.sum(acc * silu * up, 1), mask=row_ok)
        d_act = acc * w[:, None]
        d_up = d_act * silu
        d_gate = d_act * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(c_ptrs, d_gate.to(out_ty), mask=out_ok)
        tl.store(c_ptrs + N, d_up.to(out_ty), mask=out_ok)


@triton.jit
def gmm_dw_kernel(
    a_ptr,
    a_idx_ptr,
    b_ptr,
    b_idx_ptr,
    s_ptr,
    s_idx_ptr,
    out_ptr,
    offsets_ptr,
    KA,
    N,
    E,
    stride_am,
    stride_ak,
    stride_bm,
    stride_bn,
    stride_oe,
    stride_ok,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    SCALE_B: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KA: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Per-expert out[e] = A[rows of e]^T @ (s * B[rows of e]); rows optionally gathered; empty groups give 0."""
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(KA, BLOCK_KA)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_expert = tiles_k * tiles_n
    expert = pid // per_expert
    pid_k = (pid % per_expert) // tiles_n
    pid_n = pid % tiles_n
    end = tl.load(offsets_ptr + expert)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    kas = pid_k * BLOCK_KA + tl.arange(0, BLOCK_KA)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ka_ok = kas < KA
    col_ok = cols < N
    acc = tl.zeros((BLOCK_KA, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        if GATHER_A:
            a_rows = tl.load(a_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if GATHER_B:
            b_rows = tl.load(b_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        a_t = tl.load(
            a_ptr + a_rows[None, :] * stride_am + kas[:, None] * stride_ak,
            mask=ka_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + b_rows[:, None] * stride_bm + cols[None, :] * stride_bn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if SCALE_B:
            s_idx = tl.load(s_idx_ptr + rows, mask=row_ok, other=0)
            s = tl.load(s_ptr + s_idx, mask=row_ok, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * s[:, None]).to(b_ptr.dtype.element_ty)
        acc = _dot(a_t, b, acc, UPCAST)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + kas[:, None].to(tl.int64) * stride_ok + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ka_ok[:, None] & col_ok[None, :])


@triton.jit
def combine_kernel(
    src_ptr,
    pos_ptr,
    w_ptr,
    out_ptr,
    T,
    D,
    stride_src,
    stride_out,
    TOP_K: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t] = sum_k w[t,k] * src[pos[t,k]] (w = 1 when not WEIGHTED), summed in fp32 in a fixed order."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = toks < T
    ok = tok_ok[:, None] & (cols < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slot = toks * TOP_K + k
        pos = tl.load(pos_ptr + slot, mask=tok_ok, other=0).to(tl.int64)
        v = tl.load(src_ptr + pos[:, None] * stride_src + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(w_ptr + slot, mask=tok_ok, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(
        out_ptr + toks[:, None].to(tl.int64) * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok
    )


@triton.jit
def expert_histogram_kernel(ids_ptr, hist_ptr, n, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """hist[block, e] = number of slots of this block routed to expert e."""
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + idx, mask=idx < n, other=-1)
    experts = tl.arange(0, BLOCK_E)
    hist = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), 0)
    tl.store(hist_ptr + pid * E + experts, hist, mask=experts < E)


@triton.jit
def expert_scatter_kernel(
    ids_ptr,
    base_ptr,
    order_ptr,
    token_ptr,
    pos_ptr,
    n,
    E,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Place each slot at base[block, e] + (its rank among earlier same-expert slots in the block)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    idx = pid * BLOCK + offs
    ok = idx < n
    ids = tl.load(ids_ptr + idx, mask=ok, other=-1)
    earlier_same = (ids[:, None] == ids[None, :]) & (offs[None, :] < offs[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), 1)
    base = tl.load(base_ptr + pid * E + ids, mask=ok, other=0)
    dest = base + rank
    tl.store(order_ptr + dest, idx.to(tl.int64), mask=ok)
    tl.store(token_ptr + dest, idx // TOP_K, mask=ok)
    tl.store(pos_ptr + idx, dest, mask=ok)
