"""End-to-end training throughput of the real trainer (the same code as `nmoe-train`), variants side by side.

    PYTHONPATH=/tmp/site:$(ls -d packages/*/src | paste -sd:) python3 bench/train.py configs/moonlet.toml \
        --steps 40 --variants tma,pointer --profile --out DIR [--set section.key=value ...]

Variants: `nmoe` (the default expert path: fused Triton kernels, grouped GEMMs as NMOE_KERNELS_GEMM selects),
`pointer` / `tma` (the grouped GEMMs forced to pointer loads / TMA descriptors), `pytorch` (the expert path composed
from PyTorch ops:
argsort -> F.grouped_mm -> SwiGLU -> F.grouped_mm -> index_add), `ac-moe` / `ac-all` (the default path with
runtime.activation_checkpointing = moe / all). A variant may end in `@B`: B sequences per step (train.batch_size and
train.global_batch_size), e.g. `ac-all@16`. Each reports tokens/s, MFU and peak memory
from the run's own metrics (median of the log windows after the first, which holds the compile). With
--profile, three steps of the first variant run under torch.profiler and the kernel time is split by phase.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

PHASES = (  # (phase, substrings of kernel names), first match wins
    ("expert GEMMs (nmoe Triton)", ("gmm_kernel", "gmm_dw_kernel", "gmm_tma")),
    ("expert gather/combine/sort", ("combine_kernel", "expert_histogram", "expert_scatter")),
    ("fused head + loss", ("linear_ce", "_ce_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("inductor elementwise / reductions", ("triton_",)),  # before the optimizer: fused rms_norm kernels say "norm"
    ("dense GEMMs (cuBLAS)", ("gemm", "xmma", "cutlass", "sm90_", "nvjet")),
    ("optimizer + clipping", ("multi_tensor", "adam", "foreach", "_amp_", "norm_")),
)


def composed_pytorch_experts(x, topk_ids, topk_weights, w_up, w_down):
    """The expert path composed from PyTorch ops (sort -> grouped_mm -> SwiGLU -> grouped_mm -> index_add)."""
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


@contextlib.contextmanager
def variant(name: str):
    """The expert path of one variant, restored afterwards."""
    import nmoe.model.dispatch as dispatch
    from nmoe.kernels import _triton_ops

    if name in ("nmoe", "ac-moe", "ac-all"):
        yield
    elif name in ("tma", "pointer"):
        with _triton_ops.use_gemm_variant(name):
            yield
    elif name == "pytorch":
        original = dispatch.moe_experts
        dispatch.moe_experts = torch.compiler.disable(composed_pytorch_experts)
        try:
            yield
        finally:
            dispatch.moe_experts = original
    else:
        raise SystemExit(f"unknown variant {name!r}: nmoe, pointer, tma, pytorch, ac-moe or ac-all (each [@B])")


class Profile:
    """A Trainer hook: torch.profiler over steps [start + 1, start + n]; kernel time by phase afterwards."""

    def __init__(self, start: int, n: int = 3):
        self.start, self.n, self.prof = start, n, None

    def during_step(self, trainer, step):
        pass

    def after_save(self, trainer, step):
        if step == self.start:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
        elif step == self.start + self.n and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)

    def breakdown(self) -> dict[str, float]:
        """ms per step of each phase (CUDA kernel time)."""
        per_phase: dict[str, float] = {}
        for event in self.prof.key_averages():
            us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
            if us <= 0:
                continue
            name = event.key.lower()
            phase = next((label for label, keys in PHASES if any(k in name for k in keys)), "other")
            per_phase[phase] = per_phase.get(phase, 0.0) + us / 1e3 / self.n
        return dict(sorted(per_phase.items(), key=lambda kv: -kv[1]))


def run_variant(cfg, label: str, hooks=()) -> dict:
    from nmoe.metrics import read_metrics
    from nmoe.train.loop import Trainer

    torch.cuda.reset_peak_memory_stats()
    with variant(label):
        result = Trainer(cfg, hooks=hooks).run()
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
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--variants", default="nmoe")
    p.add_argument("--profile", action="store_true", help="profile 3 steps of the first variant (after step 20)")
    args = p.parse_args()
    from nmoe.train.config import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, breakdown = [], None
    for i, label in enumerate(args.variants.split(",")):
        name, _, batch = label.partition("@")
        overrides = dict(o.split("=", 1) for o in args.overrides)
        if name.startswith("ac-"):
            overrides["runtime.activation_checkpointing"] = name.removeprefix("ac-")
        if batch:
            overrides.update({"train.batch_size": batch, "train.global_batch_size": batch})
        overrides.update({
            "train.steps": str(args.steps), "optim.warmup": "10", "optim.warmdown": "10",
            "checkpoint.dir": str(out / "ckpt"), "checkpoint.resume": "never", "checkpoint.save_every": "0",
            "metrics.dir": str(out / "metrics"), "metrics.experiments_db": str(out / "runs.sqlite"),
            "runtime.run_name": f"bench-{name}-{batch or 'cfg'}-{i}", "runtime.progress": "false", "eval.eval_every": "0",
            "train.log_every": "10",
        })  # fmt: skip
        cfg = load_config(args.config, overrides=overrides)
        profile = Profile(start=min(20, args.steps - 4)) if args.profile and i == 0 else None
        results.append(run_variant(cfg, name, hooks=[profile] if profile else ()) | {"variant": label})
        if profile is not None and profile.prof is not None:
            breakdown = profile.breakdown()
        print(json.dumps(results[-1]), flush=True)
    record = {
        "config": args.config,
        "overrides": args.overrides,
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "steps": args.steps,
        "results": results,
        "profile_ms_per_step": breakdown,
    }
    (out / "train.json").write_text(json.dumps(record, indent=1))
    print(f"\n| variant | tokens/s | MFU | peak mem GiB | loss@{args.steps} |\n|---|---|---|---|---|")
    for r in results:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] else "n/a"
        print(
            f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} | {r['final_loss']:.3f} |"
        )
    if breakdown:
        total = sum(breakdown.values())
        print(
            f"\nkernel time per step ({results[0]['variant']}): {total:.1f} ms\n| phase | ms/step | share |\n|---|---|---|"
        )
        for phase, ms in breakdown.items():
            print(f"| {phase} | {ms:.1f} | {ms / total * 100:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
