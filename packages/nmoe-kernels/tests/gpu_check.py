"""GPU correctness check at real shapes (run by hand on a CUDA machine; not collected by pytest).

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python3 packages/nmoe-kernels/tests/gpu_check.py [--out DIR]

Every check draws fresh random inputs, poisons outputs (NaN / 0xFF bytes) before the run so that
unwritten elements show, and compares with the float32 reference on upcast inputs. GEMM checks run with
both grouped-GEMM variants ("pointer" loads and "tma" descriptors). Also: dropped routing slots (-1),
expert_mlp, linear_cross_entropy, no host sync, and a fullgraph torch.compile of a small MoE-like module.
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
from nmoe.kernels._triton_ops import use_gemm_variant

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


def check_grouped_mm(
    name: str, sizes: list[int], tail: int, k: int, n: int, dtype: torch.dtype, tol: float, variant: str
) -> None:
    offsets = offsets_for(sizes)
    m = sum(sizes) + tail
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(len(sizes), k, n, device="cuda", dtype=dtype) / k**0.5
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    with use_gemm_variant(variant):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        _triton_ops._launch_gmm(x, w, offsets, out)
        dx = torch.full((m, k), float("nan"), device="cuda", dtype=dtype)
        _triton_ops._launch_gmm(dy, w, offsets, dx, transpose=True)
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
        f"grouped_mm {name} [{variant}]",
        max(errs.values()) < tol and zero_ok and tail_ok,
        m=m,
        k=k,
        n=n,
        dtype=str(dtype),
        **errs,
        empty_groups_zero=zero_ok,
        tail_zero=tail_ok,
    )


def check_sort(n_tokens: int, top_k: int, n_experts: int, layout: str, dropped: float = 0.0) -> None:
    ids = routing(n_tokens, top_k, n_experts, layout)
    ids = torch.where(torch.rand(ids.shape, device="cuda") < dropped, -1, ids)
    poison_allocator(64 << 20)
    got = nk.sort_by_expert(ids, n_experts)
    want = reference.sort_by_expert(ids, n_experts)
    ok = all(torch.equal(a, b) for a, b in zip(got, want))
    record(f"sort_by_expert T={n_tokens} K={top_k} E={n_experts} {layout} dropped={dropped}", ok)


def check_moe(
    name: str,
    n_tokens: int,
    top_k: int,
    n_experts: int,
    d: int,
    h: int,
    layout: str,
    dtype: torch.dtype,
    tol: float,
    variant: str = "pointer",
    dropped: float = 0.0,
    weight_dtype: torch.dtype | None = None,  # float32: master weights under bf16 tokens (cast inside the op)
) -> None:
    ids = routing(n_tokens, top_k, n_experts, layout)
    ids = torch.where(torch.rand(ids.shape, device="cuda") < dropped, -1, ids)
    weights = torch.rand(n_tokens, top_k, device="cuda")
    x = torch.randn(n_tokens, d, device="cuda", dtype=dtype).requires_grad_()
    w_dtype = weight_dtype or dtype
    w_up = (torch.randn(n_experts, d, 2 * h, device="cuda", dtype=w_dtype) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, device="cuda", dtype=w_dtype) / h**0.5).requires_grad_()
    weights.requires_grad_()
    dy = torch.randn(n_tokens, d, device="cuda", dtype=dtype)
    rows = n_tokens * top_k
    poison_allocator(rows * (5 * h + 2 * d) * x.element_size() * 2)
    with use_gemm_variant(variant):
        y = nk.moe_experts(x, ids, weights, w_up, w_down)
        grads = torch.autograd.grad(y, (x, weights, w_up, w_down), dy)
        y_again = nk.moe_experts(x, ids, weights, w_up, w_down)
        grads_again = torch.autograd.grad(y_again, (x, weights, w_up, w_down), dy)
    deterministic = torch.equal(y, y_again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    leaves = [t.detach().float().requires_grad_() for t in (x, weights, w_up, w_down)]
    want = reference.moe_experts(leaves[0], ids, *leaves[1:])
    want_grads = torch.autograd.grad(want, leaves, dy.float())
    errs = dict(y=rel_err(y, want))
    errs.update({f"d_{n}": rel_err(g, r) for n, g, r in zip(("x", "weights", "w_up", "w_down"), grads, want_grads)})
    dropped_zero = bool(grads[1][ids < 0].eq(0).all())
    grad_dtypes = grads[2].dtype == grads[3].dtype == w_dtype and grads[0].dtype == dtype
    record(
        f"moe_experts {name} [{variant}]",
        max(errs.values()) < tol and dropped_zero and deterministic and grad_dtypes,
        deterministic=deterministic,
        dropped_slots=int((ids < 0).sum()),
        dropped_weight_grad_zero=dropped_zero,
        T=n_tokens,
        K=top_k,
        E=n_experts,
        D=d,
        H=h,
        layout=layout,
        dtype=str(dtype),
        **errs,
    )


def check_expert_mlp(
    name: str, sizes: list[int], tail: int, d: int, h: int, dtype: torch.dtype, tol: float, variant: str
) -> None:
    offsets = offsets_for(sizes)
    m, n_experts = sum(sizes) + tail, len(sizes)
    rows = torch.randn(m, d, device="cuda", dtype=dtype).requires_grad_()
    w_up = (torch.randn(n_experts, d, 2 * h, device="cuda", dtype=dtype) / d**0.5).requires_grad_()
    w_down = (torch.randn(n_experts, h, d, device="cuda", dtype=dtype) / h**0.5).requires_grad_()
    dy = torch.randn(m, d, device="cuda", dtype=dtype)
    poison_allocator(m * (5 * h + 3 * d) * rows.element_size() * 2)
    with use_gemm_variant(variant):
        y = nk.expert_mlp(rows, offsets, w_up, w_down)
        grads = torch.autograd.grad(y, (rows, w_up, w_down), dy)
    leaves = [t.detach().float().requires_grad_() for t in (rows, w_up, w_down)]
    want = reference.expert_mlp(leaves[0], offsets, *leaves[1:])
    want_grads = torch.autograd.grad(want, leaves, dy.float())
    errs = dict(y=rel_err(y, want))
    errs.update({f"d_{n}": rel_err(g, r) for n, g, r in zip(("rows", "w_up", "w_down"), grads, want_grads)})
    tail_ok = bool(y[m - tail :].eq(0).all() and grads[0][m - tail :].eq(0).all())
    empty = [e for e, s in enumerate(sizes) if s == 0]
    empty_ok = bool(grads[1][empty].eq(0).all() and grads[2][empty].eq(0).all()) if empty else True
    record(
        f"expert_mlp {name} [{variant}]",
        max(errs.values()) < tol and tail_ok and empty_ok,
        m=m,
        D=d,
        H=h,
        dtype=str(dtype),
        **errs,
        tail_zero=tail_ok,
        empty_groups_zero=empty_ok,
    )


def check_linear_cross_entropy(n: int, d: int, vocab: int, dtype: torch.dtype, master_fp32: bool, tol: float) -> None:
    h = (torch.randn(n, d, device="cuda") / d**0.25).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, device="cuda") / d**0.5).to(torch.float32 if master_fp32 else dtype)
    weight.requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[::17] = -100
    poison_allocator(8192 * vocab * 4)
    loss = nk.linear_cross_entropy(h, weight, targets)
    grads = torch.autograd.grad(loss, (h, weight))
    h32, w32 = h.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    logits = h32 @ w32.to(dtype).float().T
    if dtype == torch.bfloat16:
        logits = logits.bfloat16().float()  # ours forms the logits in bf16, as the autocast head matmul does
    want = torch.nn.functional.cross_entropy(logits, targets)
    want_grads = torch.autograd.grad(want, (h32, w32))
    errs = dict(loss=abs(loss.item() - want.item()) / want.item(), dh=rel_err(grads[0], want_grads[0]))
    errs["dw"] = rel_err(grads[1], want_grads[1])
    dtypes_ok = grads[0].dtype == dtype and grads[1].dtype == weight.dtype and loss.dtype == torch.float32
    record(
        f"linear_cross_entropy N={n} V={vocab} {dtype}{' fp32-master' if master_fp32 else ''}",
        max(errs.values()) < tol and dtypes_ok,
        **errs,
    )


class TinyMoE(torch.nn.Module):
    """Router with capacity drops -> moe_experts -> expert_mlp + grouped_mm -> fused head loss (bf16)."""

    def __init__(self, n_experts=8, d=256, h=128, vocab=4096):
        super().__init__()

        def param(*shape, scale):
            return torch.nn.Parameter((torch.randn(*shape, device="cuda") * scale).bfloat16())

        self.gate = param(n_experts, d, scale=d**-0.5)
        self.w_up, self.w_down = param(n_experts, d, 2 * h, scale=d**-0.5), param(n_experts, h, d, scale=h**-0.5)
        self.w_mix = param(n_experts, d, d, scale=d**-0.5)
        self.head = param(vocab, d, scale=d**-0.5)
        self.n_experts = n_experts

    def forward(self, x, targets):
        weights, ids = torch.sigmoid(x.float() @ self.gate.float().T).topk(2, dim=1)
        ids = torch.where(weights > 0.8, -1, ids)  # stands in for a capacity limit
        y = nk.moe_experts(x, ids, weights, self.w_up, self.w_down)
        first = ids[:, 0]  # group sizes from each token's first kept choice: they sum to <= T rows of y
        experts = torch.arange(self.n_experts, device=first.device)
        kept = (first[:, None] == experts[None, :]).to(torch.int32)  # dropped (-1) matches no expert
        offsets = kept.sum(0).cumsum(0).to(torch.int32)
        z = nk.expert_mlp(y, offsets, self.w_up, self.w_down) + nk.grouped_mm(y, self.w_mix, offsets)
        return nk.linear_cross_entropy(torch.tanh(z) + x, self.head, targets, chunk_size=1024)


def check_fullgraph_compile() -> None:
    torch.manual_seed(1)
    model = TinyMoE()
    x = torch.randn(4096, 256, device="cuda").bfloat16().requires_grad_()
    targets = torch.randint(0, 4096, (4096,), device="cuda")

    def loss_and_grads(fn):
        loss = fn(x, targets)
        return [loss.detach(), *torch.autograd.grad(loss, [x, *model.parameters()])]

    eager = loss_and_grads(model)
    compiled = loss_and_grads(torch.compile(model, fullgraph=True))  # inductor
    errs = {f"out{i}": rel_err(c, e) for i, (c, e) in enumerate(zip(compiled, eager))}
    record(
        "fullgraph torch.compile (inductor) of moe_experts/expert_mlp/grouped_mm/linear_cross_entropy",
        max(errs.values()) < 1e-2,
        **errs,
    )


def check_no_host_sync(variant: str) -> None:
    ids = routing(4096, 6, 64, "random")
    ids = torch.where(torch.rand(ids.shape, device="cuda") < 0.1, -1, ids)
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(4096, 6, device="cuda", requires_grad=True)
    w_up = torch.randn(64, 256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_down = torch.randn(64, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offsets = nk.sort_by_expert(ids, 64).offsets
    rows = torch.randn(4096 * 6, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 8192, (4096,), device="cuda")

    def run():
        nk.sort_by_expert(ids, 64)
        y = nk.moe_experts(x, ids, weights, w_up, w_down)
        torch.autograd.grad(y, (x, weights, w_up, w_down), torch.ones_like(y))
        z = nk.expert_mlp(rows, offsets, w_up, w_down)
        torch.autograd.grad(z, (rows, w_up, w_down), torch.ones_like(z))
        g = nk.grouped_mm(rows, w_up, offsets)
        torch.autograd.grad(g, (rows, w_up), torch.ones_like(g))
        loss = nk.linear_cross_entropy(x, head, targets, chunk_size=1024)
        torch.autograd.grad(loss, (x, head))

    with use_gemm_variant(variant):
        run()  # warm up: autotuning synchronises
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
            record(
                f"no host sync: sort_by_expert, moe_experts (dropped slots), expert_mlp, grouped_mm, linear_cross_entropy fwd+bwd [{variant}]",
                True,
            )
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
    checks = []
    for v in ("pointer", "tma"):
        checks += [
            lambda v=v: check_grouped_mm("moonlet up", [1536] * 64, 0, 1024, 1408, bf16, 1e-2, v),
            lambda v=v: check_grouped_mm("moonlet down", [1536] * 64, 0, 704, 1024, bf16, 1e-2, v),
            lambda v=v: check_grouped_mm(
                "empty groups + tail", [0, 3000, 0, 0, 1, 129, 0, 4000], 77, 1024, 1408, bf16, 1e-2, v
            ),
            lambda v=v: check_grouped_mm("one huge group", [0] * 31 + [40000] + [0] * 32, 0, 2048, 1408, bf16, 1e-2, v),
            lambda v=v: check_grouped_mm("fp32 (tf32 dot)", [500, 0, 1200, 37], 5, 512, 256, fp32, 5e-3, v),
            lambda v=v: check_moe("moonlet", 16384, 6, 64, 1024, 704, "random", bf16, 2e-2, v),
            lambda v=v: check_moe("moonlet 20% dropped", 8192, 6, 64, 1024, 704, "random", bf16, 2e-2, v, 0.2),
            lambda v=v: check_moe("one huge group", 8192, 6, 64, 1024, 704, "one_huge", bf16, 2e-2, v),
            lambda v=v: check_moe("speedrun-256 empty experts", 8192, 8, 256, 1024, 512, "empty", bf16, 2e-2, v),
            lambda v=v: check_moe("fp32 10% dropped", 2048, 4, 16, 256, 128, "random", fp32, 5e-3, v, 0.1),
            lambda v=v: check_moe("moonlet float32 masters", 8192, 6, 64, 1024, 704, "random", bf16, 2e-2, v, 0, fp32),
            lambda v=v: check_expert_mlp("moonlet-ep", [1536] * 8 + [0, 77], 300, 1024, 704, bf16, 2e-2, v),
            lambda v=v: check_expert_mlp("fp32", [500, 0, 1200, 37], 5, 256, 128, fp32, 5e-3, v),
            lambda v=v: check_no_host_sync(v),
        ]
    checks += [
        lambda: check_sort(16384, 6, 64, "random"),
        lambda: check_sort(32768, 8, 256, "empty"),
        lambda: check_sort(65536, 6, 64, "one_huge"),
        lambda: check_sort(16384, 6, 64, "random", 0.25),
        lambda: check_linear_cross_entropy(24576, 1024, 32768, bf16, False, 2e-2),
        lambda: check_linear_cross_entropy(8192, 1024, 32768, bf16, True, 2e-2),
        lambda: check_linear_cross_entropy(3000, 256, 5000, fp32, False, 5e-3),
        check_fullgraph_compile,
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
    print()
    print(f"| {'check':<100} | ok |")
    for r in RESULTS:
        print(f"| {r['check'][:100]:<100} | {'yes' if r['ok'] else 'NO'} |")
    print(f"gpu_check: {len(RESULTS) - len(failed)}/{len(RESULTS)} passed on {torch.cuda.get_device_name()}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
