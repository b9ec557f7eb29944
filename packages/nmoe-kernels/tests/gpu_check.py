"""GPU correctness check at real shapes (run by hand on a CUDA machine; not collected by pytest).

    PYTHONPATH=packages/nmoe-kernels/src python3 packages/nmoe-kernels/tests/gpu_check.py [--out DIR]

Every check draws fresh random inputs, poisons outputs (NaN / 0xFF bytes) before the run so that
unwritten elements show, and compares with the float32 reference on upcast inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

import nmoe.kernels as nk
from nmoe.kernels import _triton_ops, reference

RESULTS: list[dict] = []


def poison_allocator(nbytes: int) -> None:
    """Fill a large cached block with 0xFF bytes (NaN in bf16/fp32, -1 in ints) for the next allocations to reuse."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    block.fill_(0xFF)
    del block


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def record(name: str, ok: bool, **info) -> None:
    RESULTS.append(dict(check=name, ok=bool(ok), **info))
    print(f"{'PASS' if ok else 'FAIL'} {name} {info}", flush=True)


def routing(n_tokens: int, top_k: int, n_experts: int, layout: str) -> torch.Tensor:
    scores = torch.rand(n_tokens, n_experts, device="cuda")
    if layout == "one_huge":
        scores[:, 0] += 2.0  # every token picks expert 0
    if layout == "empty":
        scores[:, n_experts // 2 :] -= 2.0  # half the experts get no rows
    return scores.topk(top_k, dim=1).indices


def offsets_for(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)


def check_grouped_mm(name: str, sizes: list[int], tail: int, k: int, n: int, dtype: torch.dtype, tol: float) -> None:
    offsets = offsets_for(sizes)
    m = sum(sizes) + tail
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(len(sizes), k, n, device="cuda", dtype=dtype) / k**0.5
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    _triton_ops._launch_gmm(x, w, _triton_ops._weight_strides(w, False), offsets, out, n, k)
    dx = torch.full((m, k), float("nan"), device="cuda", dtype=dtype)
    _triton_ops._launch_gmm(dy, w, _triton_ops._weight_strides(w, True), offsets, dx, k, n)
    dw = torch.full(w.shape, float("nan"), device="cuda", dtype=dtype)
    _triton_ops._launch_dw(x, dy, offsets, dw)
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    want = reference.grouped_mm(xr, wr, offsets)
    want.backward(dy.float())
    errs = dict(out=rel_err(out, want), dx=rel_err(dx, xr.grad), dw=rel_err(dw, wr.grad))
    empty = [e for e, s in enumerate(sizes) if s == 0]
    zero_ok = bool(dw[empty].eq(0).all()) if empty else True
    tail_ok = bool(out[m - tail :].eq(0).all() and dx[m - tail :].eq(0).all())
    record(
        f"grouped_mm {name}",
        max(errs.values()) < tol and zero_ok and tail_ok,
        m=m,
        k=k,
        n=n,
        dtype=str(dtype),
        **errs,
        empty_groups_zero=zero_ok,
        tail_zero=tail_ok,
    )


def check_sort(n_tokens: int, top_k: int, n_experts: int, layout: str) -> None:
    ids = routing(n_tokens, top_k, n_experts, layout)
    poison_allocator(64 << 20)
    got = nk.sort_by_expert(ids, n_experts)
    want = reference.sort_by_expert(ids, n_experts)
    ok = all(torch.equal(a, b) for a, b in zip(got, want))
    record(f"sort_by_expert T={n_tokens} K={top_k} E={n_experts} {layout}", ok)


def check_moe(
    name: str, n_tokens: int, top_k: int, n_experts: int, d: int, h: int, layout: str, dtype: torch.dtype, tol: float
) -> None:
    ids = routing(n_tokens, top_k, n_experts, layout)
    weights = torch.rand(n_tokens, top_k, device="cuda")
    x = torch.randn(n_tokens, d, device="cuda", dtype=dtype).requires_grad_()
    w_up = (torch.randn(n_experts, d, 2 * h, device="cuda", dtype=dtype) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, device="cuda", dtype=dtype) / h**0.5).requires_grad_()
    weights.requires_grad_()
    dy = torch.randn(n_tokens, d, device="cuda", dtype=dtype)
    rows = n_tokens * top_k
    poison_allocator(rows * (5 * h + 2 * d) * x.element_size() * 2)
    y = nk.moe_experts(x, ids, weights, w_up, w_down)
    grads = torch.autograd.grad(y, (x, weights, w_up, w_down), dy)
    leaves = [t.detach().float().requires_grad_() for t in (x, weights, w_up, w_down)]
    want = reference.moe_experts(leaves[0], ids, *leaves[1:])
    want_grads = torch.autograd.grad(want, leaves, dy.float())
    errs = dict(y=rel_err(y, want))
    errs.update({f"d_{n}": rel_err(g, r) for n, g, r in zip(("x", "weights", "w_up", "w_down"), grads, want_grads)})
    record(
        f"moe_experts {name}",
        max(errs.values()) < tol,
        T=n_tokens,
        K=top_k,
        E=n_experts,
        D=d,
        H=h,
        layout=layout,
        dtype=str(dtype),
        **errs,
    )


def check_no_host_sync() -> None:
    ids = routing(4096, 6, 64, "random")
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(4096, 6, device="cuda", requires_grad=True)
    w_up = torch.randn(64, 256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_down = torch.randn(64, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    nk.moe_experts(x, ids, weights, w_up, w_down).sum().backward()  # warm up: autotuning synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        nk.sort_by_expert(ids, 64)
        y = nk.moe_experts(x, ids, weights, w_up, w_down)
        torch.autograd.grad(y, (x, weights, w_up, w_down), torch.ones_like(y))
        record("no host synchronisation in sort_by_expert / moe_experts fwd+bwd", True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_refusals() -> None:
    offsets = torch.tensor([4], dtype=torch.int32, device="cuda")
    cases = {
        "misaligned K": lambda: nk.grouped_mm(
            torch.randn(4, 24, device="cuda"), torch.randn(1, 24, 16, device="cuda"), offsets
        ),
        "fp16": lambda: nk.grouped_mm(
            torch.randn(4, 16, device="cuda").half(), torch.randn(1, 16, 16, device="cuda").half(), offsets
        ),
        "mixed devices": lambda: nk.grouped_mm(torch.randn(4, 16), torch.randn(1, 16, 16, device="cuda"), offsets),
    }
    for name, call in cases.items():
        try:
            call()
            record(f"refuses {name}", False)
        except nk.UnsupportedInput as err:
            record(f"refuses {name}", True, message=str(err))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    bf16, fp32 = torch.bfloat16, torch.float32
    checks = [
        lambda: check_grouped_mm("moonlet up", [1536] * 64, 0, 1024, 1408, bf16, 1e-2),
        lambda: check_grouped_mm("empty groups + tail", [0, 3000, 0, 0, 1, 129, 0, 4000], 77, 1024, 1408, bf16, 1e-2),
        lambda: check_grouped_mm("one huge group", [0] * 31 + [40000] + [0] * 32, 0, 2048, 1408, bf16, 1e-2),
        lambda: check_grouped_mm("fp32 (tf32 dot)", [500, 0, 1200, 37], 5, 512, 256, fp32, 5e-3),
        lambda: check_sort(16384, 6, 64, "random"),
        lambda: check_sort(32768, 8, 256, "empty"),
        lambda: check_sort(65536, 6, 64, "one_huge"),
        lambda: check_moe("moonlet", 16384, 6, 64, 1024, 704, "random", bf16, 2e-2),
        lambda: check_moe("moonlet one huge group", 8192, 6, 64, 1024, 704, "one_huge", bf16, 2e-2),
        lambda: check_moe("speedrun-256 empty experts", 8192, 8, 256, 1024, 512, "empty", bf16, 2e-2),
        lambda: check_moe("fp32", 2048, 4, 16, 256, 128, "random", fp32, 5e-3),
        check_no_host_sync,
        check_refusals,
    ]
    for check in checks:
        try:
            check()
        except Exception as err:  # keep going: one device call should report every check
            record(
                f"crashed: {getattr(check, '__name__', 'check')}",
                False,
                error=repr(err),
                trace=traceback.format_exc(limit=4),
            )
    failed = [r for r in RESULTS if not r["ok"]]
    print(f"gpu_check: {len(RESULTS) - len(failed)}/{len(RESULTS)} passed on {torch.cuda.get_device_name()}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
