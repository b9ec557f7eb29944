"""The resume contract: 2N steps straight == N steps, a crash, N more steps — bitwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nmoe.metrics import read_metrics
from nmoe.train.checkpoint import find_latest

pytestmark = pytest.mark.slow


FAULTS = Path(__file__).with_name("harness.py")


def train(cfg_path: Path, *, fault: str | None = None, extra_env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.run(
        [sys.executable, str(FAULTS), str(cfg_path), *(["--fault", fault] if fault else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cfg_path.parent,
    )


def losses(tmp: Path, run_id: str) -> dict[int, float]:
    rows = read_metrics(tmp / "metrics", run_id, tags=["train/loss"])
    out = {}
    for row in rows:  # later rows (the resumed process) win for any re-done step
        out[int(row[1])] = row[3]
    return out


def final_state(ckpt_root: Path) -> dict[str, torch.Tensor]:
    latest = find_latest(ckpt_root)
    state = {}
    for f in sorted(latest.glob("*.pt")):  # weights and optimizer state, expert shards included
        obj = torch.load(f, weights_only=True)
        for k, v in obj.items():
            if torch.is_tensor(v):
                state[f"{f.name}:{k}"] = v
            else:
                for kk, vv in v.items():
                    state[f"{f.name}:{k}:{kk}"] = vv if torch.is_tensor(vv) else torch.tensor(vv)
    return state


def run_id_of(tmp: Path, name: str) -> str:
    ids = [p.name for p in (tmp / "metrics").iterdir() if p.name.startswith(name + "-")]
    assert len(ids) == 1, ids
    return ids[0]


# "2:KILL" with eval_every = save_every = 2: the checkpoint follows an evaluation, whose forward passes
# must not leak router load into the next expert-bias update.
@pytest.mark.parametrize("fault,every", [("4:KILL", 4), ("2:KILL", 2), ("4:TERM", 4), ("5:TERM", 4), ("3:INT", 4)])
def test_resume_is_bitwise(tmp_path, text_corpus, fault, every, make_config):
    cadence = dict(
        eval={"eval_every": every, "eval_batches": 2},
        checkpoint={"dir": str(tmp_path / "ckpt"), "save_every": every, "keep_last": 5},
    )
    straight = tmp_path / "straight.toml"
    straight.write_text(
        make_config(
            tmp_path, text_corpus, runtime={"run_name": "straight", "device": "cpu", "progress": False}, **cadence
        )
    )
    done = train(straight)
    assert done.returncode == 0, done.stderr[-3000:]

    crashed = tmp_path / "crashed.toml"
    crashed.write_text(
        make_config(
            tmp_path, text_corpus, runtime={"run_name": "crashed", "device": "cpu", "progress": False}, **cadence
        )
    )
    first = train(crashed, fault=fault)
    expected_rc = {"KILL": -9, "TERM": 143, "INT": 130}[fault.split(":")[1]]
    assert first.returncode == expected_rc, (first.returncode, first.stdout[-2000:], first.stderr[-3000:])
    stop_step = int(fault.split(":")[0])
    assert find_latest(tmp_path / "ckpt" / "crashed").name == f"step_{stop_step:08d}"
    second = train(crashed)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout

    a = losses(tmp_path, run_id_of(tmp_path, "straight"))
    b = losses(tmp_path, run_id_of(tmp_path, "crashed"))
    assert sorted(a) == list(range(1, 9)) and a == b  # exact float equality, every step
    sa, sb = final_state(tmp_path / "ckpt" / "straight"), final_state(tmp_path / "ckpt" / "crashed")
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_refuses_checkpoint_from_another_config(tmp_path, text_corpus, make_config):
    cfg = tmp_path / "run.toml"
    cfg.write_text(make_config(tmp_path, text_corpus, runtime={"run_name": "r", "device": "cpu", "progress": False}))
    assert train(cfg, fault="4:KILL").returncode == -9
    cfg.write_text(
        make_config(
            tmp_path,
            text_corpus,
            runtime={"run_name": "r", "device": "cpu", "progress": False},
            optim={"lr": 1e-2, "warmup": 2, "warmdown": 3},
        )
    )
    again = train(cfg)
    assert again.returncode == 1
    assert "does not match this run" in again.stderr and "optim.lr: checkpoint 0.003, this run 0.01" in again.stderr
    assert "Traceback" not in again.stderr
