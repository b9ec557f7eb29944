"""End-to-end training throughput: nmoe-train on a config, nmoe kernels vs the composed-PyTorch expert path.

Runs the real trainer (same code as `nmoe-train`) for a few steps per variant, side by side in one process
on one GPU, and reports tokens/s, MFU and peak memory from the run's own metrics.

  python3 bench/train.py configs/moonlet.toml --steps 60 --set data.source=files ... --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch


def composed_pytorch_experts(x, topk_ids, topk_weights, w_up, w_down):
    """The expert path composed from PyTorch ops (sort → grouped_mm → SwiGLU → grouped_mm → index_add)."""
    T, K = topk_ids.shape
    E, D, H2 = w_up.shape
    H = H2 // 2
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // K]
    h = torch.nn.functional.grouped_mm(xs, w_up, offs=offsets)
    a = torch.nn.functional.silu(h[:, :H]) * h[:, H:]
    y = torch.nn.functional.grouped_mm(a, w_down, offs=offsets)
    y = y * topk_weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, order // K, y)


def run_variant(cfg, label: str, patch) -> dict:
    from nmoe.metrics import read_metrics
    from nmoe.train.loop import Trainer

    torch.cuda.reset_peak_memory_stats()
    undo = patch()
    try:
        result = Trainer(cfg).run()
    finally:
        undo()
    rows = read_metrics(cfg.metrics.dir, result.run_id, tags=["perf/tokens_per_s", "perf/mfu", "perf/peak_mem_gib"])
    by_tag: dict[str, list[float]] = {}
    for row in rows:
        by_tag.setdefault(row.tag, []).append(row.value)
    tok = by_tag.get("perf/tokens_per_s", [])[1:] or by_tag.get("perf/tokens_per_s", [0.0])  # drop the compile window
    mfu = by_tag.get("perf/mfu", [])[1:] or by_tag.get("perf/mfu", [0.0])
    return {
        "variant": label,
        "tokens_per_s": statistics.median(tok),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_gib": max(by_tag.get("perf/peak_mem_gib", [0.0])),
        "final_loss": result.losses[max(result.losses)],
        "steps": result.step,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--variants", default="nmoe,pytorch")
    args = p.parse_args()
    import nmoe.model.moe as moe_mod
    from nmoe.train.config import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants.split(","):
        overrides = dict(o.split("=", 1) for o in args.overrides)
        overrides.update(
            {
                "train.steps": str(args.steps),
                "optim.warmup": "10",
                "optim.warmdown": "10",
                "checkpoint.dir": str(out / "ckpt"),
                "checkpoint.resume": "never",
                "metrics.dir": str(out / "metrics"),
                "metrics.experiments_db": str(out / "runs.sqlite"),
                "runtime.run_name": f"bench-{variant}",
                "runtime.progress": "false",
                "eval.eval_every": "0",
                "train.log_every": "10",
            }
        )
        cfg = load_config(args.config, overrides=overrides)

        def patch(variant=variant):
            if variant == "nmoe":
                return lambda: None
            original = moe_mod.moe_experts
            moe_mod.moe_experts = composed_pytorch_experts
            return lambda: setattr(moe_mod, "moe_experts", original)

        results.append(run_variant(cfg, variant, patch))
        print(json.dumps(results[-1]), flush=True)
    record = {
        "config": args.config,
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "steps": args.steps,
        "results": results,
    }
    (out / "train.json").write_text(json.dumps(record, indent=1))
    print(f"\n| variant | tokens/s | MFU | peak mem GiB | loss@{args.steps} |\n|---|---|---|---|---|")
    for r in results:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] else "n/a"
        print(
            f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} | {r['final_loss']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
