"""Fixtures for the NVIZ tests: a finished tiny run, a baseline, a registry-only crash, a damaged file,
a leaderboard, and a live run that a background thread keeps writing. Built with MetricsWriter/Registry."""

from __future__ import annotations

import itertools
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from nmoe.metrics import MetricsWriter, Registry

N_LAYERS = 2
N_EXPERTS = 8
CONFIG_TOML = "[model]\nn_layers = 2\nn_experts = 8\n\n[train]\nsteps = 60\n"


@dataclass
class NvizFixture:
    metrics_dir: Path
    registry_db: Path
    leaderboard: Path


def expert_load(step: int, layer: int, rank: int) -> list[float]:
    """Routed slots per expert: expert 0 of layer 1 is hot, the rest near uniform (exact, for assertions)."""
    return [
        100.0 + 10 * ((e + step + rank) % 3) + (300.0 if (layer == 1 and e == 0) else 0.0) for e in range(N_EXPERTS)
    ]


def log_step(w: MetricsWriter, step: int, rank: int, loss_scale: float = 1.0) -> None:
    """One trainer-like step: train scalars every step; perf, router, precision and expert load every 5."""
    loss = loss_scale * (4.0 * math.exp(-step / 25) + 1.5)
    values = {"train/loss": loss, "train/grad_norm": 1.0 / (1 + step / 10), "train/lr": 3e-4 * min(1.0, step / 10)}
    values["train/tokens_seen"] = float(step * 4096)
    if step % 5 == 0:
        values |= {
            "perf/tokens_per_s": 50000.0 + 100 * rank + step,
            "perf/step_time_s": 0.08 + 0.01 * rank,
            "perf/mfu": 0.31 + 0.01 * rank,
            "perf/peak_mem_gib": 12.5 + rank,
            "perf/mem_allocated_mib": 9000.0 + 10 * step,
            "perf/mem_reserved_mib": 11000.0,
        }
        for layer in range(N_LAYERS):
            p = f"router/layer{layer:02d}/"
            values |= {
                p + "load_cv": 0.1 + 0.4 * layer,
                p + "load_max_over_mean": 1.2 + layer,
                p + "entropy_mean": 1.9 - 1.6 * layer,  # layer 01 breaks the runbook: 0.3 < 0.5
                p + "max_gate_mean": 0.4 + 0.55 * layer,  # layer 01: 0.95 > 0.9
                p + "collapse_frac": 0.0,
                p + "dropped_tokens": float(layer * 3),
                p + "dropped_frac": layer * 0.001,
                p + "bias_min": -0.01,
                p + "bias_max": 0.01,
            }
            w.log_array(step, p + "expert_load", expert_load(step, layer, rank))
        values |= {"router/mean/load_cv": 0.3, "router/mean/entropy_mean": 1.1}
    if step % 10 == 0:
        for layer in range(N_LAYERS):
            values[f"precision/layer{layer:02d}/flip_frac"] = 1e-4 * (1 + layer)
            values[f"precision/layer{layer:02d}/quant_err"] = 0.02 + 0.01 * layer
    if step % 20 == 0:
        values["val/loss"] = loss + 0.05
    w.log(step, values)


def _start(reg: Registry, run_id: str, world_size: int, device: str) -> None:
    reg.start(
        run_id,
        name="tiny",
        config_toml=CONFIG_TOML,
        fingerprint="f1e2d3c4b5a69788",
        git_rev="0123456789abcdef0123",
        world_size=world_size,
        device=device,
    )


@pytest.fixture(scope="module")
def nviz_sources(tmp_path_factory) -> NvizFixture:
    """See `build_sources`; one per test module."""
    return build_sources(tmp_path_factory.mktemp("nviz"))


def build_sources(root: Path) -> NvizFixture:
    """A registry and metrics dir under `root`: tiny-done (2 ranks, finished, all tags), tiny-base (1 rank),
    crashed (registry only), broken (a damaged rank file), and a leaderboard."""
    src = NvizFixture(root / "metrics", root / "experiments.sqlite", root / "LEADERBOARD.json")
    reg = Registry(src.registry_db)
    _start(reg, "crashed", 1, "cpu (2 cores, host)")
    reg.finish("crashed", "failed", {"train/loss": math.nan}, step=3)
    _start(reg, "tiny-base", 1, "NVIDIA H100 80GB HBM3")
    with MetricsWriter(src.metrics_dir, "tiny-base", flush_every_s=60) as w:
        for step in range(1, 61):
            log_step(w, step, 0, loss_scale=1.1)
    reg.finish("tiny-base", "completed", {"step": 60, "train/loss": 1.9, "val/loss": 2.0, "target_reached": 0}, step=60)
    _start(reg, "tiny-done", 2, "NVIDIA H100 80GB HBM3")
    for rank in (0, 1):
        with MetricsWriter(src.metrics_dir, "tiny-done", rank=rank, flush_every_s=60) as w:
            for step in range(1, 61):
                log_step(w, step, rank)
            if rank == 0:
                w.log(61, {"train/loss": math.nan})  # a diverged step stays visible as a marker
    final = {"step": 61, "train/loss": 1.8, "val/loss": 1.85, "target_reached": 1, "tokens_per_s": 50100.0, "mfu": 0.31}
    reg.finish("tiny-done", "completed", final, step=61)
    broken = src.metrics_dir / "broken"
    broken.mkdir()
    (broken / "rank_0.duckdb").write_bytes(b"this is not a duckdb file" * 100)
    entry = dict(config="tiny", fingerprint="f1e2", git_rev="0123", gpu="H100", gpu_count=8, steps=60, tokens=245760)
    src.leaderboard.write_text(
        json.dumps(
            {
                "format": "nmoe.leaderboard/1",
                "entries": [
                    {
                        **entry,
                        "run_id": "slow",
                        "wall_clock_s": 900.0,
                        "val_loss": 3.2,
                        "target_loss": 3.28,
                        "target_reached": True,
                        "core": None,
                        "date": "2026-01-02",
                    },
                    {
                        **entry,
                        "run_id": "missed",
                        "wall_clock_s": 100.0,
                        "val_loss": 3.5,
                        "target_loss": 3.28,
                        "target_reached": False,
                        "core": None,
                        "date": "2026-01-03",
                    },
                    {
                        **entry,
                        "run_id": "tiny-done",
                        "wall_clock_s": 600.0,
                        "val_loss": 3.1,
                        "target_loss": 3.28,
                        "target_reached": True,
                        "core": {"score": 0.12, "n_tasks": 2, "tasks": {"arc_easy": 0.2, "piqa": 0.04}},
                        "date": "2026-01-04",
                    },
                ],
            }
        )
    )
    return src


class LiveRun:
    """A background thread logging one step every `interval_s` to `run_id` (registry status running)."""

    def __init__(self, src: NvizFixture, run_id: str, interval_s: float = 0.05) -> None:
        self.src, self.run_id, self.interval_s = src, run_id, interval_s
        reg = Registry(src.registry_db)
        _start(reg, run_id, 1, "NVIDIA H100 80GB HBM3")
        self.writer = MetricsWriter(src.metrics_dir, run_id, flush_every_s=0.1)
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.step += 1
            log_step(self.writer, self.step, 0)

    def __enter__(self) -> LiveRun:
        for _ in range(10):  # some history before anyone looks
            self.step += 1
            log_step(self.writer, self.step, 0)
        self.writer.flush()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.writer.close()
        Registry(self.src.registry_db).finish(self.run_id, "interrupted", {}, step=self.step)


_live_ids = itertools.count()


@pytest.fixture
def live_run(nviz_sources):
    with LiveRun(nviz_sources, f"live-{next(_live_ids)}") as live:
        yield live


@pytest.fixture(scope="session")
def nviz_helpers():
    """Helpers of this file for the tests (conftest is not importable under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        expert_load=expert_load, n_layers=N_LAYERS, n_experts=N_EXPERTS, build_sources=build_sources, LiveRun=LiveRun
    )
