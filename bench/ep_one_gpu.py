"""Expert-parallel training with 2 ranks sharing one GPU against 1 rank, same global batch: the loss curves.

    PYTHONPATH=/tmp/site:$(ls -d packages/*/src | paste -sd:) python3 bench/ep_one_gpu.py CONFIG --out DIR [--set ...]

Runs `python -m nmoe.train CONFIG` once on one process and once under torchrun with 2 processes on the one
GPU (two NVSHMEM PEs on one device, gloo for the data-parallel reductions: correct, not fast), then prints
the per-step train loss of both and their largest relative difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run(nproc: int, config: str, out: Path, name: str, sets: list[str]) -> subprocess.CompletedProcess:
    args = [config, *sum((["--set", s] for s in sets), []), "--set", f"runtime.run_name={name}",
            "--set", f"checkpoint.dir={out / 'ckpt'}", "--set", f"metrics.dir={out / 'metrics'}",
            "--set", f"metrics.experiments_db={out / 'runs.sqlite'}", "--set", "runtime.progress=false"]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, "-m", "nmoe.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "nmoe.train", *args]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    return proc


def losses(out: Path, name: str) -> dict[int, float]:
    from nmoe.metrics import read_metrics

    run_id = next(p.name for p in (out / "metrics").iterdir() if p.name.startswith(name + "-"))
    return {int(r[1]): r[3] for r in read_metrics(out / "metrics", run_id, tags=["train/loss"], rank=0)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for nproc, name in ((1, "one_rank"), (2, "two_ranks")):
        proc = run(nproc, args.config, out, name, args.sets)
        print(
            f"{name}: exit {proc.returncode}; last lines:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-4:])
        )
        results[name] = losses(out, name) if proc.returncode == 0 else {}
    one, two = results["one_rank"], results["two_ranks"]
    steps = sorted(set(one) & set(two))
    worst = max((abs(one[s] - two[s]) / abs(one[s]) for s in steps), default=float("nan"))
    (out / "losses.json").write_text(json.dumps({"one_rank": one, "two_ranks": two, "max_rel_diff": worst}))
    print("\n| step | 1 rank | 2 ranks (EP 2, one GPU) |\n| --- | --- | --- |")
    for s in steps[:: max(1, len(steps) // 10)] + steps[-1:]:
        print(f"| {s} | {one[s]:.4f} | {two[s]:.4f} |")
    print(f"max relative difference over {len(steps)} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
