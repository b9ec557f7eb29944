"""The loss-gap study: the same model, data and steps with the routed experts in bf16, fp8 and NVFP4 (each rule).

    PYTHONPATH=/tmp/site:$(ls -d packages/*/src | paste -sd:) python3 bench/precision.py configs/moonlet.toml \
        --out DIR --steps 300 [--set section.key=value ...]

Runs the real trainer once per variant, one after the other in this process, on identical batches (same
seed, same data): final val loss, its gap to bf16, the mean code-flip rate of the NVFP4 experts over the run
(and over its second half), tokens/s and peak memory. Writes DIR/precision.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

VARIANTS = {
    "bf16": {"model.expert_precision": "bf16"},
    "fp8 rowwise": {  # every GEMM in fp8, promoted to float32 every 128 (the recipe before 2026-11-24 evening)
        "model.expert_precision": "fp8",
        "model.fp8_wgrad": "true",
        "model.fp8_fast_accum": "false",
    },
    "fp8 blockwise": {
        "model.expert_precision": "fp8",
        "model.fp8_scaling": "blockwise",
        "model.fp8_wgrad": "true",
        "model.fp8_fast_accum": "false",
    },
    "fp8 rowwise bf16-dW": {
        "model.expert_precision": "fp8",
        "model.fp8_wgrad": "false",
        "model.fp8_fast_accum": "false",
    },
    # the default before 2026-11-25: fast accumulation, bf16 dW
    "fp8 rowwise fast bf16-dW": {"model.expert_precision": "fp8", "model.fp8_wgrad": "false"},
    "fp8 rowwise fast fp8-dW": {"model.expert_precision": "fp8"},  # the defaults: fast accumulation, fp8 dW
    "nvfp4 nearest": {"model.expert_precision": "nvfp4", "optim.nvfp4_rule": "nearest"},
    "nvfp4 seed dither": {"model.expert_precision": "nvfp4", "optim.nvfp4_rule": "seed"},
    "nvfp4 stochastic": {"model.expert_precision": "nvfp4", "optim.nvfp4_rule": "stochastic"},
    "nvfp4 residual": {"model.expert_precision": "nvfp4", "optim.nvfp4_rule": "residual"},
}


def run(config: str, label: str, overrides: dict[str, str], out: Path) -> dict:
    from nmoe.metrics import read_metrics
    from nmoe.train.config import load_config
    from nmoe.train.loop import Trainer

    cfg = load_config(config, overrides={**overrides, **VARIANTS[label], "runtime.run_name": label.replace(" ", "-")})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = Trainer(cfg).run()
    rows = read_metrics(cfg.metrics.dir, result.run_id)
    by_step: dict[str, dict[int, float]] = {}
    for r in rows:
        by_step.setdefault(r.tag, {})[r.step] = r.value
    flips = {}
    for tag, series in by_step.items():
        if tag.endswith("/flip_frac"):
            for step, v in series.items():
                flips.setdefault(step, []).append(v)
    mean_flip = {step: statistics.mean(v) for step, v in sorted(flips.items())}
    half = [v for s, v in mean_flip.items() if s > cfg.train.steps // 2]
    tok = list(by_step.get("perf/tokens_per_s", {}).values())[1:]
    return {
        "variant": label,
        "val_loss": result.val_loss,
        "val_curve": by_step.get("val/loss", {}),
        "train_loss": result.losses[max(result.losses)],
        "flip_frac_mean": statistics.mean(mean_flip.values()) if mean_flip else None,
        "flip_frac_second_half": statistics.mean(half) if half else None,
        "flip_curve": mean_flip,
        "tokens_per_s": statistics.median(tok) if tok else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(o.split("=", 1) for o in args.overrides)
    overrides.update({
        "train.steps": str(args.steps), "checkpoint.dir": str(out / "ckpt"), "checkpoint.resume": "never",
        "checkpoint.save_every": "0", "metrics.dir": str(out / "metrics"),
        "metrics.experiments_db": str(out / "runs.sqlite"), "runtime.progress": "false",
    })  # fmt: skip
    results = []
    for label in args.variants.split(","):
        results.append(run(args.config, label, overrides, out))
        print(json.dumps({k: v for k, v in results[-1].items() if not k.endswith("curve")}), flush=True)
        record = {"config": args.config, "overrides": args.overrides, "steps": args.steps,
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": datetime.date.today().isoformat(), "results": results}  # fmt: skip
        (out / "precision.json").write_text(json.dumps(record, indent=1))
    base = next((r["val_loss"] for r in results if r["variant"] == "bf16"), None)
    print(f"\n{args.steps} steps | variant | val loss | gap to bf16 | flip rate (run / 2nd half) | tokens/s | peak GiB")
    print("|---|---|---|---|---|---|")
    for r in results:
        gap = f"{r['val_loss'] - base:+.3f}" if base is not None else "n/a"
        flips = (
            f"{r['flip_frac_mean'] * 100:.2f}% / {r['flip_frac_second_half'] * 100:.2f}%"
            if r["flip_frac_mean"]
            else "—"
        )
        tok = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "n/a"
        print(f"| {r['variant']} | {r['val_loss']:.4f} | {gap} | {flips} | {tok} | {r['peak_mem_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
