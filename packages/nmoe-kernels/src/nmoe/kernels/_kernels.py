"""Triton kernels. Imported only on the GPU path (or by tests under TRITON_INTERPRET=1)."""

from __future__ import annotations

import triton
import triton.language as tl

EPILOGUE_STORE = 0  # C = A @ B
EPILOGUE_SWIGLU = 1  # H = A @ [Bg | Bu] stored, C = silu(Hg) * Hu
# the SwiGLU backward runs after a plain dgrad GEMM, on whole rows (_lowprec_kernels.swiglu_bwd_rows_kernel)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b; UPCAST (interpreter only, whose bf16 dot is wrong) multiplies in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _load_weight_tile(desc, expert, k0, col0, TRANS_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile of B[expert] through a 3-d TMA descriptor (of B^T's storage when TRANS_B)."""
    if TRANS_B:
        return tl.trans(desc.load([expert, col0, k0]).reshape(BLOCK_N, BLOCK_K))
    return desc.load([expert, k0, col0]).reshape(BLOCK_K, BLOCK_N)


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
    A_TMA: tl.constexpr = False,
    B_TMA: tl.constexpr = False,
    TRANS_B: tl.constexpr = False,
):
    """Grouped C[rows of e] = A[rows] @ B[e] with an optional row gather of A and a fused epilogue.

    EPILOGUE_SWIGLU: B has 2N columns (gate | up); H[:, :N], H[:, N:] get gate/up, C gets silu(gate)*up.
    A_TMA / B_TMA: a_ptr is a TMA descriptor of A[M,K] (block [BLOCK_M, BLOCK_K]) / b_ptr one of the weights
    [E,K,N] (block [1, BLOCK_K, BLOCK_N]) or, with TRANS_B, of [E,N,K] (block [1, BLOCK_N, BLOCK_K]) used
    transposed; the strides are then unused. A tile's rows past its group read other rows of A (or TMA's
    zero fill past M): each output row depends only on its own A row, and the store is masked to the group.
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
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    if not A_TMA:
        if GATHER_A:
            a_rows = tl.load(a_idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            a_rows = rows64
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    if not B_TMA:
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(is_tail, 0, K)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = (k0 + ks) < K
        if A_TMA:
            a = a_ptr.load([row0, k0])
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a_ptrs += BLOCK_K * stride_ak
        if B_TMA:
            b = _load_weight_tile(b_ptr, expert, k0, col0, TRANS_B, BLOCK_K, BLOCK_N)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST)
        if EPILOGUE == 1:
            if B_TMA:
                b_up = _load_weight_tile(b_ptr, expert, k0, col0 + N, TRANS_B, BLOCK_K, BLOCK_N)
            else:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = _dot(a, b_up, acc_up, UPCAST)
        if not B_TMA:
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


@triton.jit
def _load_rows_t(base, rows, kas, ka_ok, row_ok, stride_m, stride_k):
    """[BLOCK_KA, BLOCK_M] transposed tile of rows `rows` of a row-major matrix."""
    src = rows.to(tl.int64)
    return tl.load(
        base + src[None, :] * stride_m + kas[:, None] * stride_k, mask=ka_ok[:, None] & row_ok[None, :], other=0.0
    )


@triton.jit
def _load_rows(base, idx_ptr, rows, cols, col_ok, row_ok, stride_m, stride_n, GATHER: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tile of rows `rows` (gathered through idx_ptr) of a row-major matrix."""
    if GATHER:
        src = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    return tl.load(
        base + src[:, None] * stride_m + cols[None, :] * stride_n, mask=row_ok[:, None] & col_ok[None, :], other=0.0
    )


@triton.jit
def _scale_rows(b, s_ptr, s_idx_ptr, rows, row_ok, out_ty):
    """b[r, :] * s[s_idx[r]] in fp32, back to out_ty."""
    s_idx = tl.load(s_idx_ptr + rows, mask=row_ok, other=0)
    s = tl.load(s_ptr + s_idx, mask=row_ok, other=0.0).to(tl.float32)
    return (b.to(tl.float32) * s[:, None]).to(out_ty)


@triton.jit
def gmm_dw_kernel(
    a_ptr,
    b_ptr,
    a_base,
    b_base,
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
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    A_TMA: tl.constexpr = False,
    B_TMA: tl.constexpr = False,
):
    """Per-expert out[e] = A[rows of e]^T @ B[rows of e]; empty groups give 0. (Gathered or weighted operands are
    materialised by gather_rows_kernel first, so that both can come by TMA.)

    A_TMA / B_TMA: a_ptr / b_ptr are TMA descriptors of A[M,KA] (block
    [BLOCK_M, BLOCK_KA]) / B[M,N] (block [BLOCK_M, BLOCK_N]), used for the group's whole BLOCK_M-row tiles;
    the last partial tile of a group goes through masked pointer loads (a_base / b_base) since rows past the
    group must not enter the reduction.
    """
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
    masked_from = start
    if A_TMA or B_TMA:
        masked_from = start + (end - start) // BLOCK_M * BLOCK_M
        for r0 in range(start, masked_from, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            if A_TMA:
                a_t = tl.trans(a_ptr.load([r0, pid_k * BLOCK_KA]))
            else:
                a_t = _load_rows_t(a_base, rows, kas, ka_ok, rows >= 0, stride_am, stride_ak)
            if B_TMA:
                b = b_ptr.load([r0, pid_n * BLOCK_N])
            else:
                b = _load_rows(b_base, b_base, rows, cols, col_ok, rows >= 0, stride_bm, stride_bn, False)
            acc = _dot(a_t, b, acc, UPCAST)
    for r0 in range(masked_from, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a_t = _load_rows_t(a_base, rows, kas, ka_ok, row_ok, stride_am, stride_ak)
        b = _load_rows(b_base, b_base, rows, cols, col_ok, row_ok, stride_bm, stride_bn, False)
        acc = _dot(a_t, b, acc, UPCAST)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + kas[:, None].to(tl.int64) * stride_ok + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ka_ok[:, None] & col_ok[None, :])


@triton.jit
def gather_rows_kernel(
    src_ptr,
    idx_ptr,
    s_ptr,
    s_idx_ptr,
    out_ptr,
    R,
    D,
    stride_src,
    stride_out,
    SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[r] = src[idx[r]], times s[s_idx[r]] in fp32 rounded back to src's dtype when SCALE."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    x = _load_rows(src_ptr, idx_ptr, rows, cols, cols < D, row_ok, stride_src, 1, True)
    if SCALE:
        x = _scale_rows(x, s_ptr, s_idx_ptr, rows, row_ok, src_ptr.dtype.element_ty)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out, x, mask=row_ok[:, None] & (cols < D)[None, :])


@triton.jit
def combine_kernel(
    src_ptr,
    pos_ptr,
    w_ptr,
    out_ptr,
    kept_rows_ptr,
    T,
    D,
    stride_src,
    stride_out,
    TOP_K: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t] = sum_k w[t,k] * src[pos[t,k]] (w = 1 when not WEIGHTED), summed in fp32 in a fixed order.

    Slots whose row is >= kept_rows[0] (dropped slots, grouped after the last expert) are skipped.
    """
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = toks < T
    col_ok = (cols < D)[None, :]
    kept_rows = tl.load(kept_rows_ptr)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slot = toks * TOP_K + k
        pos = tl.load(pos_ptr + slot, mask=tok_ok, other=0)
        kept = tok_ok & (pos < kept_rows)
        v = tl.load(
            src_ptr + pos.to(tl.int64)[:, None] * stride_src + cols[None, :], mask=kept[:, None] & col_ok, other=0.0
        ).to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(w_ptr + slot, mask=kept, other=0.0).to(tl.float32)[:, None]
        acc += v
    ok = tok_ok[:, None] & col_ok
    tl.store(
        out_ptr + toks[:, None].to(tl.int64) * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok
    )


@triton.jit
def _load_bins(ids_ptr, idx, n, E):
    """Bin of each slot: its expert id, E for a dropped slot (id < 0), -1 past the end."""
    ok = idx < n
    ids = tl.load(ids_ptr + idx, mask=ok, other=0)
    return tl.where(ok, tl.where(ids < 0, E, ids), -1)


@triton.jit
def expert_histogram_kernel(ids_ptr, hist_ptr, n, E, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """hist[block, b] = number of slots of this block in bin b (b < E: expert b; b == E: dropped)."""
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    bins = _load_bins(ids_ptr, idx, n, E)
    experts = tl.arange(0, BLOCK_E)
    hist = tl.sum((bins[:, None] == experts[None, :]).to(tl.int32), 0)
    tl.store(hist_ptr + pid * (E + 1) + experts, hist, mask=experts <= E)


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
    """Place each slot at base[block, bin] + (its rank among earlier same-bin slots in the block)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    idx = pid * BLOCK + offs
    ok = idx < n
    bins = _load_bins(ids_ptr, idx, n, E)
    earlier_same = (bins[:, None] == bins[None, :]) & (offs[None, :] < offs[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), 1)
    base = tl.load(base_ptr + pid * (E + 1) + bins, mask=ok, other=0)
    dest = base + rank
    tl.store(order_ptr + dest, idx.to(tl.int64), mask=ok)
    tl.store(token_ptr + dest, idx // TOP_K, mask=ok)
    tl.store(pos_ptr + idx, dest, mask=ok)


@triton.jit
def cross_entropy_rows_kernel(
    logits_ptr,
    targets_ptr,
    loss_ptr,
    scale_ptr,
    V,
    stride_row,
    ignore_index,
    WITH_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row: loss = logsumexp(z) - z[target] (0 for ignore_index) in fp32; with WITH_GRAD the row of logits is
    overwritten by scale * (softmax(z) - onehot(target)) (0 for an ignored row), scale = scale_ptr[0]."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)
    run_max = tl.full((BLOCK_V,), -3.0e38, tl.float32)
    run_sum = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
        run_max = new_max
    row_max = tl.max(run_max, 0)
    lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), 0))
    z_target = tl.load(base + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))
    if WITH_GRAD:
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for v0 in range(0, V, BLOCK_V):
            ok = v0 + cols < V
            z = tl.load(base + v0 + cols, mask=ok, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - tl.where(v0 + cols == target, 1.0, 0.0)
            tl.store(base + v0 + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=ok)
