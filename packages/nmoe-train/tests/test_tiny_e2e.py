"""Acceptance on CPU: configs/tiny.toml trains on the shared corpus, val loss falls well below the
unigram entropy of the data, and the metrics and the registry are written."""

import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from nmoe.metrics import latest
from nmoe.train.config import load_config
from nmoe.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT.parent / "shared" / "corpus" / "docs.jsonl.gz"

pytestmark = pytest.mark.slow


def unigram_entropy(data_dir: Path) -> float:
    counts = None
    for shard in sorted(data_dir.glob("train_*.npy")):
        c = np.bincount(np.load(shard, mmap_mode="r"))
        counts = (
            c
            if counts is None
            else np.pad(counts, (0, max(0, len(c) - len(counts)))) + np.pad(c, (0, max(0, len(counts) - len(c))))
        )
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.skipif(not CORPUS.is_file(), reason=f"shared corpus not found at {CORPUS} (../shared beside the repo)")
def test_tiny_learns_on_real_text(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's input path is relative to the repo root
    cfg = load_config(
        ROOT / "configs" / "tiny.toml",
        env={},
        overrides={
            "data.data_dir": str(tmp_path / "data"),
            "data.tokenizer": str(tmp_path / "data" / "tok.json"),
            "checkpoint.dir": str(tmp_path / "ckpt"),
            "metrics.dir": str(tmp_path / "metrics"),
            "metrics.experiments_db": str(tmp_path / "runs.sqlite"),
            "runtime.progress": "false",
        },
    )
    result = Trainer(cfg, log=lambda s: None).run()
    assert result.status == "completed" and result.step == cfg.train.steps
    entropy = unigram_entropy(tmp_path / "data" / cfg.data.name)
    assert math.isfinite(result.val_loss) and result.val_loss < entropy - 1.0, (result.val_loss, entropy)
    values = latest(tmp_path / "metrics", result.run_id)
    for tag in ("train/loss", "val/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "router/layer01/load_cv"):
        assert tag in values, tag
    row = (
        sqlite3.connect(tmp_path / "runs.sqlite")
        .execute("SELECT status, last_step, fingerprint FROM runs WHERE run_id = ?", (result.run_id,))
        .fetchone()
    )
    assert row == ("completed", cfg.train.steps, cfg.fingerprint)
