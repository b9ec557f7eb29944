"""Expert precision through the trainer on CPU (the plain-PyTorch references): fp8 GEMMs and NVFP4 storage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmoe.metrics import latest, read_metrics
from nmoe.train.checkpoint import find_latest

pytestmark = pytest.mark.slow
HARNESS = Path(__file__).with_name("harness.py")
MODEL = {"dim": 32, "moe_inter_dim": 16}  # aligned for the low-precision ops (16-element NVFP4 blocks)


def run(cfg: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(HARNESS), str(cfg), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cfg.parent)  # fmt: skip


def config(tmp, make_config, corpus, prepared, name, **model):
    path = tmp / f"{name}.toml"
    runtime = {"run_name": name, "device": "cpu", "progress": False}
    path.write_text(make_config(tmp, corpus, data=prepared, model=model, runtime=runtime,
                                train={"steps": 6, "log_every": 2}, optim={"lr": 3e-3, "warmup": 1, "warmdown": 2},
                                checkpoint={"dir": str(tmp / "ckpt"), "save_every": 3, "keep_last": 3}))  # fmt: skip
    return path


def losses(tmp, name):
    run_id = next(p.name for p in (tmp / "metrics").iterdir() if p.name.startswith(name + "-"))
    return run_id, {int(r[1]): r[3] for r in read_metrics(tmp / "metrics", run_id, tags=["train/loss"])}


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_low_precision_experts_train_and_resume_bitwise(tmp_path, make_config, text_corpus, prepared_data, precision):
    model = dict(MODEL, expert_precision=precision)
    straight = config(tmp_path, make_config, text_corpus, prepared_data, "straight", **model)
    done = run(straight)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id, a = losses(tmp_path, "straight")
    assert sorted(a) == list(range(1, 7)) and all(torch.isfinite(torch.tensor(v)) for v in a.values())
    crashed = config(tmp_path, make_config, text_corpus, prepared_data, "crashed", **model)
    assert run(crashed, "--fault", "3:KILL").returncode == -9
    again = run(crashed)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    assert losses(tmp_path, "crashed")[1] == a  # bitwise, every step
    if precision == "nvfp4":
        values = latest(tmp_path / "metrics", run_id)
        assert "precision/layer01/flip_frac" in values and "precision/layer01/quant_err" in values
        shard = torch.load(find_latest(tmp_path / "ckpt" / "straight") / "experts_ep0.pt", weights_only=True)
        assert shard["blocks.1.ffn.w_up_nvfp4_codes"].dtype == torch.uint8  # the codes are the stored weights
        assert shard["blocks.1.ffn.w_up"].dtype == torch.bfloat16
