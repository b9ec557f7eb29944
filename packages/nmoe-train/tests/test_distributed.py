"""Expert-parallel training on CPU: torchrun worlds (gloo + the shared-memory RDEP transport) against one rank.

- W ranks with the experts sharded over them train like one rank on the same global batch (losses per step,
  reduced dense gradients, expert gradients of every shard);
- a SIGKILLed rank: the run resumes bitwise at the same world size, and at another one (2 -> 1, 1 -> 2);
- a rank that dies mid-step: its peers stop within the timeout naming it (no hang);
- bad parallel settings stop every rank with one clear message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nmoe.metrics import read_metrics

pytestmark = pytest.mark.slow
HARNESS = Path(__file__).with_name("harness.py")


def write_config(tmp: Path, make_config, corpus, prepared, name: str, **sections) -> Path:
    sections.setdefault("train", {})
    sections["train"] = {
        "steps": 10,
        "seq_len": 32,
        "global_batch_size": 8,
        "batch_size": 0,
        "seed": 7,
        "log_every": 2,
        **sections["train"],
    }
    sections.setdefault("checkpoint", {"dir": str(tmp / "ckpt"), "save_every": 5, "keep_last": 5})
    sections.setdefault("eval", {"eval_every": 5, "eval_batches": 2})
    runtime = {"run_name": name, "device": "cpu", "progress": False}
    path = tmp / f"{name}.toml"
    path.write_text(make_config(tmp, corpus, data=prepared, runtime=runtime, **sections))
    return path


def launch(nproc: int, cfg: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """nmoe-train (with test hooks) on `nproc` ranks through torchrun; one process without torchrun when 1."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, str(HARNESS), str(cfg), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HARNESS), str(cfg), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cfg.parent)


def losses(tmp: Path, name: str) -> dict[int, float]:
    run = [p.name for p in (tmp / "metrics").iterdir() if p.name.startswith(name + "-")]
    assert len(run) == 1, run
    return {int(r[1]): r[3] for r in read_metrics(tmp / "metrics", run[0], tags=["train/loss"], rank=0)}


def load_grads(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(dense grads of rank 0, every expert tensor's grad assembled over the ranks by global expert index)."""
    dumps = [torch.load(p, weights_only=False) for p in sorted(folder.glob("rank*.pt"))]
    names = dumps[0]["expert_names"]
    dense = {n: g for n, g in dumps[0]["grads"].items() if n not in names}
    for other in dumps[1:]:  # every rank holds the same reduced dense gradients
        for n in dense:
            assert torch.equal(other["grads"][n], dense[n]), n
    ordered = sorted(dumps, key=lambda d: d["experts"][0])
    experts = {n: torch.cat([d["grads"][n] for d in ordered]) for n in names}
    return dense, experts


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, rtol=2e-4) -> None:
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * scale + 1e-7, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_world_equals_one_rank(tmp_path, make_config, text_corpus, prepared_data, world):
    cfg = write_config(tmp_path, make_config, text_corpus, prepared_data, "one")
    (tmp_path / "g1").mkdir()
    one = launch(1, cfg, "--dump-grads", f"3:{tmp_path / 'g1'}")
    assert one.returncode == 0, one.stderr[-3000:]
    cfg_w = write_config(tmp_path, make_config, text_corpus, prepared_data, "many")
    (tmp_path / "gw").mkdir()
    many = launch(world, cfg_w, "--dump-grads", f"3:{tmp_path / 'gw'}")
    assert many.returncode == 0, many.stderr[-4000:]
    assert f"{world} rank(s), expert-parallel {world}" in many.stdout

    a, b = losses(tmp_path, "one"), losses(tmp_path, "many")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    dense1, experts1 = load_grads(tmp_path / "g1")
    densew, expertsw = load_grads(tmp_path / "gw")
    assert dense1.keys() == densew.keys() and experts1.keys() == expertsw.keys() and experts1
    for name in dense1:
        assert_close(densew[name], dense1[name], name)
    for name in experts1:
        assert expertsw[name].shape == experts1[name].shape
        assert_close(expertsw[name], experts1[name], name)
    shards = sorted((tmp_path / "ckpt" / "many" / "step_00000010").glob("experts_ep*.pt"))
    assert len(shards) == 2 * world  # weights and optimizer state of every expert-parallel rank


def final_state(ckpt_root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the latest checkpoint, expert shards concatenated by global expert index."""
    from nmoe.train.checkpoint import find_latest, read_meta

    latest = find_latest(ckpt_root)
    meta = read_meta(latest)
    state = {}
    for name in ("dense.pt", "dense_optim.pt"):
        state.update(_flatten(name, torch.load(latest / name, weights_only=True)))
    for optim in (False, True):
        files = sorted(
            (f for f, info in meta["files"].items() if "experts" in info and f.endswith("_optim.pt") == optim),
            key=lambda f: meta["files"][f]["experts"][0],
        )
        parts = [
            _flatten("experts" + ("_optim" if optim else ""), torch.load(latest / f, weights_only=True)) for f in files
        ]
        for key in parts[0]:
            tensors = [p[key] for p in parts]
            state[key] = torch.cat(tensors) if tensors[0].dim() else tensors[0]
    return state


def _flatten(prefix, obj):
    out = {}
    for k, v in obj.items():
        if torch.is_tensor(v):
            out[f"{prefix}:{k}"] = v
        else:
            for kk, vv in v.items():
                out[f"{prefix}:{k}:{kk}"] = vv if torch.is_tensor(vv) else torch.tensor(vv)
    return out


def test_a_killed_rank_resumes_bitwise_at_the_same_world(tmp_path, make_config, text_corpus, prepared_data):
    straight = write_config(tmp_path, make_config, text_corpus, prepared_data, "straight")
    assert launch(2, straight).returncode == 0
    crashed = write_config(tmp_path, make_config, text_corpus, prepared_data, "crashed")
    first = launch(2, crashed, "--fault", "5:KILL", "--fault-rank", "1")
    assert first.returncode != 0
    second = launch(2, crashed)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_00000005" in second.stdout
    assert losses(tmp_path, "straight") == losses(tmp_path, "crashed")  # exact, every step
    a, b = final_state(tmp_path / "ckpt" / "straight"), final_state(tmp_path / "ckpt" / "crashed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("first_world,then_world", [(2, 1), (1, 2)])
def test_resume_at_another_expert_parallel_size_continues_the_run(
    tmp_path, make_config, text_corpus, prepared_data, first_world, then_world
):
    straight = write_config(tmp_path, make_config, text_corpus, prepared_data, "straight")
    assert launch(first_world, straight).returncode == 0
    moved = write_config(tmp_path, make_config, text_corpus, prepared_data, "moved")
    assert launch(first_world, moved, "--fault", "5:KILL").returncode != 0
    resumed = launch(then_world, moved)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"experts re-sharded from {first_world} to {then_world} ranks" in resumed.stdout
    a, b = losses(tmp_path, "straight"), losses(tmp_path, "moved")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in range(1, 6):
        assert a[step] == b[step]  # written by the same world before the move
    for step in range(6, 11):
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    sa, sb = final_state(tmp_path / "ckpt" / "straight"), final_state(tmp_path / "ckpt" / "moved")
    for key in sa:
        assert_close(sb[key].double(), sa[key].double(), key, rtol=1e-3)


def ranks_output(stderr: str) -> str:
    """What the ranks printed: torchrun's own report of a failed worker (a ChildFailedError traceback) cut off."""
    return stderr.split("torch/distributed/elastic")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_stops_its_peers_naming_it(tmp_path, make_config, text_corpus, prepared_data):
    cfg = write_config(
        tmp_path, make_config, text_corpus, prepared_data, "dead", parallel={"wait_timeout_s": 60.0},
        train={"steps": 50},
    )  # fmt: skip
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HARNESS), str(cfg)],
                env=env,
                cwd=tmp_path,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list((tmp_path / "metrics").glob("dead-*/rank_0.duckdb")):
        time.sleep(0.5)
    time.sleep(3)  # in the middle of training
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - start < 90
    assert procs[0].returncode not in (0, None)
    assert "rank(s) [1]" in err and "Traceback" not in err, err[-3000:]


def test_bad_parallel_settings_are_one_clear_error(tmp_path, make_config, text_corpus, prepared_data):
    from nmoe.train.config import build_config
    from nmoe.train.runtime import SetupError, plan_run

    def cfg(**parallel):
        import tomllib

        text = make_config(tmp_path, text_corpus, data=prepared_data, parallel=parallel, train={"batch_size": 0})
        return build_config(tomllib.loads(text), "test", env={})

    with pytest.raises(SetupError, match=r"model.n_routed_experts = 4 is not divisible by the expert-parallel size 3"):
        plan_run(cfg(), world_size=3, cuda_available=False)
    with pytest.raises(SetupError, match=r"parallel.ep_size = 4 does not divide the world size 2"):
        plan_run(cfg(ep_size=4), world_size=2, cuda_available=False)
    with pytest.raises(SetupError, match=r"global_batch_size = 8 is not divisible by the world size 3"):
        plan_run(cfg(ep_size=1), world_size=3, cuda_available=False)
    assert plan_run(cfg(ep_size=2), world_size=4, cuda_available=False).replicas == 2

    bad = write_config(tmp_path, make_config, text_corpus, prepared_data, "bad", parallel={"ep_size": 4})
    proc = launch(2, bad)
    assert proc.returncode != 0
    assert proc.stderr.count("parallel.ep_size = 4 does not divide the world size 2") == 2  # one line per rank
    assert "Traceback" not in ranks_output(proc.stderr)
    typo = write_config(tmp_path, make_config, text_corpus, prepared_data, "typo", parallel={"transport": "mpi"})
    proc = launch(1, typo)
    assert proc.returncode == 2 and "`parallel.transport` = 'mpi' is not allowed" in proc.stderr
    lone = dict(os.environ, WORLD_SIZE="2")
    lone.pop("MASTER_ADDR", None)
    good = write_config(tmp_path, make_config, text_corpus, prepared_data, "lone")
    proc = subprocess.run([sys.executable, str(HARNESS), str(good)], env=lone, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "launch several processes with torchrun" in proc.stderr


def test_a_signal_on_one_rank_stops_every_rank_at_one_checkpoint(tmp_path, make_config, text_corpus, prepared_data):
    straight = write_config(tmp_path, make_config, text_corpus, prepared_data, "straight")
    assert launch(2, straight).returncode == 0
    stopped = write_config(tmp_path, make_config, text_corpus, prepared_data, "stopped")
    first = launch(2, stopped, "--fault", "4:TERM", "--fault-rank", "1")  # only rank 1 gets SIGTERM
    assert first.returncode != 0
    assert "SIGTERM: saved" in first.stdout and "step_00000004" in first.stdout, first.stdout[-2000:]
    from nmoe.train.checkpoint import find_latest

    assert find_latest(tmp_path / "ckpt" / "stopped").name == "step_00000004"  # save_every 5: the signal's save
    again = launch(2, stopped)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    assert losses(tmp_path, "straight") == losses(tmp_path, "stopped")
    a, b = final_state(tmp_path / "ckpt" / "straight"), final_state(tmp_path / "ckpt" / "stopped")
    for key in a:
        assert torch.equal(a[key], b[key]), key
