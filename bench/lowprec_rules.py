"""Which NVFP4 rounding rule trains best? A teacher-student SwiGLU MLP on CPU (minutes; no GPU needed).

    uv run python bench/lowprec_rules.py [--steps 600] [--out bench/results/lowprec_rules.json]

A student MLP y = down(silu(x W_g) * (x W_u)) learns a fixed random teacher of the same shape from fresh
Gaussian inputs each step (MSE), with AdamW and a warmup + cosine learning-rate schedule. The student's
weights are stored in NVFP4 and updated by nmoe.kernels.nvfp4_adamw_ (plain-PyTorch reference on CPU)
with each rule; the baseline keeps fp32 weights (torch's AdamW). Reported: final held-out loss, its gap to
the fp32 baseline (in log space, like a nats gap), and mean flip rate. A toy: it shows whether a rule lets
small late-training updates through, not what the gap will be on a language model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nmoe.kernels as nk

REPO = Path(__file__).resolve().parents[1]
D, H, BATCH = 128, 256, 256


def forward(x, w_up, w_down):
    gate, up = (x @ w_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def schedule(step: int, steps: int, peak: float) -> float:
    warmup = steps // 20
    if step <= warmup:
        return peak * step / warmup
    t = (step - warmup) / (steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def run(rule: str | None, steps: int, lr: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(D, 2 * H, generator=g) / D**0.5, torch.randn(H, D, generator=g) / H**0.5)
    init = [torch.randn(D, 2 * H, generator=g) * 0.02, torch.randn(H, D, generator=g) * 0.02]
    x_eval = torch.randn(4096, D, generator=g)
    y_eval = forward(x_eval, *teacher)
    hyper = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)
    data = torch.Generator().manual_seed(seed + 1)
    if rule is None:
        params = [p.clone().requires_grad_() for p in init]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    else:
        stored = [nk.quantize_nvfp4(p) for p in init]
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in init]
        residuals = [torch.zeros(p.shape, dtype=torch.bfloat16) if rule == "residual" else None for p in init]
    flips = []
    for step in range(1, steps + 1):
        x = torch.randn(BATCH, D, generator=data)
        y = forward(x, *teacher)
        step_lr = schedule(step, steps, lr)
        if rule is None:
            loss = F.mse_loss(forward(x, *params), y)
            opt.zero_grad()
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = step_lr
            opt.step()
            continue
        weights = [nk.dequantize_nvfp4(q, torch.float32).requires_grad_() for q in stored]
        loss = F.mse_loss(forward(x, *weights), y)
        grads = torch.autograd.grad(loss, weights)
        for i, (q, grad, (m, v), r) in enumerate(zip(stored, grads, moments, residuals)):
            stats = nk.nvfp4_adamw_(
                q, grad, m, v, step=step, lr=step_lr, **hyper, rule=rule, seed=seed * 1000 + i, residual=r
            )
            flips.append(stats.flips.item() / stats.numel)
    with torch.no_grad():
        final = (
            [p.detach() for p in params] if rule is None else [nk.dequantize_nvfp4(q, torch.float32) for q in stored]
        )
        eval_loss = F.mse_loss(forward(x_eval, *final), y_eval).item()
    late = flips[len(flips) // 2 :] if flips else [0.0]
    return dict(
        rule=rule or "fp32",
        eval_loss=eval_loss,
        flip_frac=sum(flips) / max(len(flips), 1),
        late_flip_frac=sum(late) / len(late),
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lowprec_rules.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    start = time.time()
    for seed in range(args.seeds):
        for rule in (None, "nearest", "seed", "stochastic", "residual"):
            row = dict(seed=seed, **run(rule, args.steps, args.lr, seed))
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for rule in ("fp32", "nearest", "seed", "stochastic", "residual"):
        mine = [r for r in rows if r["rule"] == rule]
        base = {r["seed"]: r["eval_loss"] for r in rows if r["rule"] == "fp32"}
        summary[rule] = dict(
            eval_loss=sum(r["eval_loss"] for r in mine) / len(mine),
            log_gap=sum(math.log(r["eval_loss"] / base[r["seed"]]) for r in mine) / len(mine),
            flip_frac=sum(r["flip_frac"] for r in mine) / len(mine),
            late_flip_frac=sum(r["late_flip_frac"] for r in mine) / len(mine),
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(dict(args=vars(args) | {"out": str(args.out)}, runs=rows, summary=summary), indent=1)
    )
    print(f"\n{args.steps} steps, peak lr {args.lr}, {args.seeds} seeds, {time.time() - start:.0f}s on CPU")
    print("| rule | eval MSE | log gap vs fp32 | flip rate (all / 2nd half) | extra bytes/param |")
    print("| --- | --- | --- | --- | --- |")
    for rule, s in summary.items():
        extra = "—" if rule == "fp32" else f"{nk.expert_param_bytes('nvfp4', rule)['residual']:.0f}"
        print(
            f"| {rule} | {s['eval_loss']:.4g} | {s['log_gap']:+.3f} | "
            f"{100 * s['flip_frac']:.2f}% / {100 * s['late_flip_frac']:.2f}% | {extra} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
