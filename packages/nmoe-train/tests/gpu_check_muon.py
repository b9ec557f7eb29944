"""GPU check of Muon at a real shape (run by hand on a CUDA machine; not collected by pytest).

    uv run python packages/nmoe-train/tests/gpu_check_muon.py [--config configs/moonlet.toml]

1. Newton–Schulz in bf16 on the GPU for every distinct matrix block of the config's model (gaussian gradients):
   singular values of orth(G) stay below 1.3 and their median lies in the quintic's band [0.68, 1.21];
   the direction agrees with an fp64 CPU iteration within 10% (relative Frobenius; bf16 rounding).
2. Expert-parallel invariance on CUDA: a Muon step (momentum + orthogonalisation + decay) of the routed experts
   [E, D, 2H] and [E, H, D] as one tensor vs split into P = 2, 4, 8 shards stepped separately: bitwise equal?
   (batched cuBLAS GEMMs and reductions may pick their kernel by batch count; a FAIL means they did.)
3. Determinism: the same Muon step of the whole model twice from the same state: bitwise equal.
4. Time of one optimizer step of the whole model (random gradients): fused AdamW vs AdamW + Muon, and one MoE
   layer's experts batched vs looped over experts (the by-construction sharding-invariant alternative).
A table is printed last; exit code 1 if a hard check failed.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path

import torch

from nmoe.model import ModelConfig, Transformer
from nmoe.train.config import OptimConfig
from nmoe.train.muon import Muon, matrix_blocks, orthogonalize
from nmoe.train.optim import build_optimizer, fused_splits, set_lr

ROWS: list[tuple[str, str, str]] = []
DEVICE = "cuda"  # --device cpu: a smoke run of this script on a small config


def row(check: str, result: str, ok: bool | None) -> None:
    verdict = "info" if ok is None else ("PASS" if ok else "FAIL")
    ROWS.append((check, result, verdict))
    print(f"{verdict:4}  {check}: {result}", flush=True)


def sync_time() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def build(cfg: ModelConfig) -> Transformer:
    with torch.device(DEVICE):
        model = Transformer(cfg)
    model.init_weights(0)
    return model


def random_grads(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=DEVICE) * 1e-3


def check_newton_schulz(model: Transformer) -> None:
    """model may be on the meta device: only its shapes are read."""
    params, splits = dict(model.named_parameters()), fused_splits(model)
    shapes = set()
    for name, p in params.items():
        if p.dim() >= 2 and not name.endswith(("tok_emb.weight", "head.weight", ".gate")):
            for axis, _, size in matrix_blocks(p.shape, splits.get(name)):
                shape = list(p.shape[-2:])
                shape[axis] = size
                shapes.add(tuple(shape))
    worst = (1.0, 1.0, 0.0)
    for shape in sorted(shapes):
        g = torch.randn(shape, device=DEVICE)
        sv = torch.linalg.svdvals(orthogonalize(g).double())
        worst = (min(worst[0], sv.min().item()), max(worst[1], sv.max().item()), worst[2])
        med = sv.median().item()
        ok = sv.max().item() <= 1.3 and 0.68 <= med <= 1.21
        ref = orthogonalize(g.double().cpu(), dtype=torch.float64)
        rel = ((orthogonalize(g).double().cpu() - ref).norm() / ref.norm()).item()
        worst = (worst[0], worst[1], max(worst[2], rel))
        if not ok or rel > 0.1:
            row(f"NS {shape}", f"sv min {sv.min():.3f} median {med:.3f} max {sv.max():.3f}, vs fp64 {rel:.3f}", False)
    row(f"NS bf16, {len(shapes)} block shapes", f"sv in [{worst[0]:.3f}, {worst[1]:.3f}], vs fp64 <= {worst[2]:.3f}",
        worst[1] <= 1.3 and worst[2] <= 0.1)  # fmt: skip


def muon_step_of_experts(w: torch.Tensor, grads: list[torch.Tensor], shards: int, split) -> torch.Tensor:
    per = w.shape[0] // shards
    params = [torch.nn.Parameter(w[i * per : (i + 1) * per].clone()) for i in range(shards)]
    opt = Muon(params, lr=0.02, weight_decay=0.1, splits={p: split for p in params} if split else None)
    for g in grads:
        for i, p in enumerate(params):
            p.grad = g[i * per : (i + 1) * per].clone()
        opt.step()
    return torch.cat([p.detach() for p in params])


def check_expert_parallel(cfg: ModelConfig) -> None:
    e, d, h = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
    for label, shape, split in (("w_up", (e, d, 2 * h), (-1, (h, h))), ("w_down", (e, h, d), None)):
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        w = torch.randn(shape, generator=gen, device=DEVICE) * 0.02
        grads = [torch.randn(shape, generator=gen, device=DEVICE) for _ in range(2)]
        whole = muon_step_of_experts(w, grads, 1, split)
        for shards in (2, 4, 8):
            if e % shards:
                continue
            got = muon_step_of_experts(w, grads, shards, split)
            diff = (got - whole).abs().max().item()
            row(f"EP invariance {label} {list(shape)} 1 vs {shards} shards", f"max abs diff {diff:.3e}", diff == 0.0)


def optimizer_cfg(kind: str) -> OptimConfig:
    return OptimConfig(lr=3e-3, optimizer=kind, muon_lr=0.02)


def check_determinism_and_time(cfg: ModelConfig) -> None:
    model = build(cfg)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = []
    for _ in range(2):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        opt = build_optimizer(model, optimizer_cfg("muon"), fused=DEVICE == "cuda")
        for step in range(2):
            random_grads(model, step)
            opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        del opt
    same = all(torch.equal(results[0][n], results[1][n]) for n in start)
    row("determinism: whole-model Muon+AdamW steps twice", "bitwise equal" if same else "differ", same)
    del results
    for kind in ("adamw", "muon"):
        opt = build_optimizer(model, optimizer_cfg(kind), fused=DEVICE == "cuda")
        set_lr(opt, 1e-3)
        random_grads(model, 0)
        for _ in range(2):
            opt.step()
        t0 = sync_time()
        for _ in range(5):
            opt.step()
        ms = (sync_time() - t0) / 5 * 1e3
        n = sum(p.numel() for p in model.parameters())
        row(f"optimizer step, {kind}", f"{ms:.1f} ms ({n / 1e9:.2f}B params)", None)
        del opt
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    e, d, h = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
    g = torch.randn(e, d, 2 * h, device=DEVICE)
    for label, fn in (
        ("batched", lambda: orthogonalize(g)),
        ("per-expert loop", lambda: torch.stack([orthogonalize(g[i]) for i in range(e)])),
    ):
        fn()
        t0 = sync_time()
        for _ in range(5):
            fn()
        row(f"orth of w_up [{e}, {d}, {2 * h}], {label}", f"{(sync_time() - t0) / 5 * 1e3:.2f} ms", None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/moonlet.toml")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    cfg = ModelConfig(**tomllib.loads(Path(args.config).read_text())["model"])
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{name} torch {torch.__version__} config {args.config}")
    with torch.device("meta"):
        check_newton_schulz(Transformer(cfg))
    check_expert_parallel(cfg)
    check_determinism_and_time(cfg)
    print("\n| check | result | verdict |\n| --- | --- | --- |")
    for check, result, verdict in ROWS:
        print(f"| {check} | {result} | {verdict} |")
    return 1 if any(v == "FAIL" for _, _, v in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
