"""End-to-end training throughput of the real trainer (the same code as `nmoe-train`), variants side by side.

    PYTHONPATH=/tmp/site:$(ls -d packages/*/src | paste -sd:) python3 bench/train.py configs/moonlet.toml \
        --steps 40 --variants tma,pointer --profile --out DIR [--set section.key=value ...]

Variants: `nmoe` (the default expert path: fused Triton kernels, grouped GEMMs as NMOE_KERNELS_GEMM selects),
`pointer` / `tma` (the grouped GEMMs forced to pointer loads / TMA descriptors), `pytorch` (the expert path composed
from PyTorch ops:
argsort -> F.grouped_mm -> SwiGLU -> F.grouped_mm -> index_add), `ac-moe` / `ac-all` (the default path with
runtime.activation_checkpointing = moe / all), `fp8` (model.expert_precision = fp8, its default recipe). A variant may end in `@B`: B sequences per step (train.batch_size and
train.global_batch_size), e.g. `ac-all@16`. Each reports tokens/s, MFU and peak memory
from the run's own metrics (median of the log windows after the first, which holds the compile). With
--profile, three steps of each variant run under torch.profiler: their wall ms per step beside the kernel time,
split by phase, and the top kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PHASES = (  # (phase, substrings of kernel names), first match wins
    ("expert GEMMs (nmoe Triton)", ("gmm_kernel", "gmm_dw_kernel", "gmm_tma", "gmm_fp8")),
    ("expert fp8 quantisers", ("fp8_quant",)),
    ("expert gather/combine/sort", ("combine_kernel", "expert_histogram", "expert_scatter", "gather_rows")),
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
    import nmoe.model.moe as moe
    from nmoe.kernels import _triton_ops

    if name in ("nmoe", "ac-moe", "ac-all", "fp8"):
        yield
    elif name in ("tma", "pointer"):
        with _triton_ops.use_gemm_variant(name):
            yield
    elif name == "pytorch":
        original = moe.moe_experts  # what fused_experts_of builds bf16 MoE layers from
        moe.moe_experts = torch.compiler.disable(composed_pytorch_experts)
        try:
            yield
        finally:
            moe.moe_experts = original
    else:
        raise SystemExit(f"unknown variant {name!r}: nmoe, pointer, tma, pytorch, ac-moe, ac-all or fp8 (each [@B])")


class Profile:
    """A Trainer hook: torch.profiler over steps [start + 1, start + n]; kernel time by phase afterwards."""

    def __init__(self, start: int, n: int = 3):
        self.start, self.n, self.prof, self.wall_ms, self.t0 = start, n, None, None, 0.0

    def during_step(self, trainer, step):
        pass

    def after_save(self, trainer, step):
        if step == self.start:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif step == self.start + self.n and self.prof is not None:
            torch.cuda.synchronize()
            self.wall_ms = (time.perf_counter() - self.t0) * 1e3 / self.n
            self.prof.__exit__(None, None, None)

    def top_kernels(self, k: int = 12) -> list[tuple[str, float]]:
        """The k kernels with the most CUDA time: (name, ms per step)."""
        rows = []
        for event in self.prof.key_averages():
            us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
            if us > 0:
                rows.append((event.key[:90], us / 1e3 / self.n))
        return sorted(rows, key=lambda r: -r[1])[:k]

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
    p.add_argument("--profile", action="store_true", help="profile 3 steps of each variant (after step 20)")
    args = p.parse_args()
    from nmoe.train.config import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, label in enumerate(args.variants.split(",")):
        name, _, batch = label.partition("@")
        overrides = dict(o.split("=", 1) for o in args.overrides)
        if name == "fp8":
            overrides["model.expert_precision"] = "fp8"
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
        profile = Profile(start=min(20, args.steps - 4)) if args.profile else None
        results.append(run_variant(cfg, name, hooks=[profile] if profile else ()) | {"variant": label})
        if profile is not None and profile.prof is not None:
            results[-1]["profile_ms_per_step"] = profile.breakdown()
            results[-1]["profile_wall_ms_per_step"] = profile.wall_ms
            results[-1]["profile_top_kernels"] = profile.top_kernels()
        print(json.dumps(results[-1]), flush=True)
    record = {
        "config": args.config,
        "overrides": args.overrides,
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
    for r in results:
        if "profile_ms_per_step" in r:
            print_profile(r)
    return 0


def print_profile(r: dict) -> None:
    breakdown = r["profile_ms_per_step"]
    total = sum(breakdown.values())
    print(
        f"\n{r['variant']}: wall {r['profile_wall_ms_per_step']:.1f} ms per profiled step, kernel time {total:.1f} ms"
    )
    print("| phase | ms/step | share |\n|---|---|---|")
    for phase, ms in breakdown.items():
        print(f"| {phase} | {ms:.1f} | {ms / total * 100:.0f}% |")
    for name, ms in r["profile_top_kernels"]:
        print(f"    {ms:7.3f}  {name}")


if __name__ == "__main__":
    sys.exit(main())
