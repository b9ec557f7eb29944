"""Fault injection through the real CLI: every case ends bitwise equal to an uninterrupted run, or with one
clear message (exit status, no traceback) and nothing lost — and a rerun after it still ends bitwise equal.

Runs are children of one fork server (harness.Launcher): real processes running `nmoe-train` (plus the
test hooks of harness.py) that are killed with real signals, without paying the import for each run.
Every run trains the same 8-step tiny config (a checkpoint every 2 steps) as the module's reference run.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from nmoe.metrics import read_metrics
from nmoe.train import checkpoint as ckpt

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
STEPS, SAVE_EVERY = 8, 2


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"nmoe_train_tests_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


harness, conftest = _load("harness"), _load("conftest")


# ---------------------------------------------------------------------------------------------- helpers
class Run:
    """One run folder (checkpoints, metrics, registry) and its config file."""

    def __init__(self, root: Path, corpus: Path, prepared: dict, keep_last: int = 10, **sections):
        self.root, self.name = root, "run"
        root.mkdir(parents=True, exist_ok=True)
        sections = {
            "data": {**prepared, **sections.pop("data", {})},
            "checkpoint": {"dir": str(root / "ckpt"), "save_every": SAVE_EVERY, "keep_last": keep_last},
            "runtime": {"run_name": self.name, "device": "cpu", "progress": False},
            **sections,
        }
        self.cfg = root / "run.toml"
        self.cfg.write_text(conftest.tiny_config(root, corpus, **sections))
        self.ckpts = Path(sections["checkpoint"]["dir"]) / self.name

    def step_dir(self, step: int) -> Path:
        return self.ckpts / ckpt.step_dir_name(step)

    def run_id(self) -> str:
        """The run id of the newest checkpoint (runs killed before their first checkpoint had others)."""
        newest = ckpt.find_latest(self.ckpts)
        if newest is not None:
            return ckpt.read_meta(newest)["run_id"]
        ids = [p.name for p in (self.root / "metrics").iterdir() if p.name.startswith(self.name + "-")]
        assert len(ids) == 1, ids
        return ids[0]

    def loss_rows(self) -> list[tuple[int, float]]:
        rows = read_metrics(self.root / "metrics", self.run_id(), tags=["train/loss"])
        return sorted((r.step, r.value) for r in rows)


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor (weights, buffers, optimizer state) of the checkpoint in `folder`."""
    state = {}
    for f in sorted(folder.glob("*.pt")):
        for k, v in torch.load(f, weights_only=True).items():
            items = v.items() if isinstance(v, dict) else [("", v)]
            for kk, vv in items:
                state[f"{f.name}:{k}:{kk}"] = vv if torch.is_tensor(vv) else torch.tensor(vv)
    return state


def assert_bitwise(run: Run, reference: Run) -> None:
    """Exactly one train/loss row per step 1..STEPS, each equal to the reference's; the final state identical."""
    rows = run.loss_rows()
    counts = Counter(step for step, _ in rows)
    assert sorted(counts) == list(range(1, STEPS + 1)) and set(counts.values()) == {1}, counts
    assert rows == reference.loss_rows()  # exact float equality
    assert ckpt.find_latest(run.ckpts) == run.step_dir(STEPS)
    mine, ref = final_state(run.step_dir(STEPS)), final_state(reference.step_dir(STEPS))
    assert mine.keys() == ref.keys()
    for key in ref:
        assert torch.equal(mine[key], ref[key]), key


def assert_clear_error(result, rc: int, *needles: str) -> str:
    """Exit status `rc`, exactly one error message on stderr, no traceback, containing every needle."""
    assert result.rc == rc, (result.rc, result.stdout[-2000:], result.stderr[-3000:])
    err = result.stderr
    assert "Traceback" not in err, err[-3000:]
    assert err.count("error: ") == 1, err[-3000:]
    for needle in needles:
        assert needle in err, (needle, err[-3000:])
    return err


def intact_steps(run: Run) -> list[int]:
    """Steps of the checkpoints that verify completely, oldest first."""
    good = []
    for folder in ckpt.step_dirs(run.ckpts):
        try:
            meta = ckpt.read_meta(folder)
        except ckpt.CheckpointError:
            continue
        if ckpt.verify_files(folder, meta, ckpt.files_to_check(meta)) is None:
            good.append(meta["step"])
    return good


def no_half_checkpoint(run: Run) -> None:
    """Every step_* folder is complete (meta.json and every file it lists); a crash leaves only dot-folders."""
    for folder in ckpt.step_dirs(run.ckpts):
        meta = ckpt.read_meta(folder)
        assert ckpt.verify_files(folder, meta, ckpt.files_to_check(meta)) is None, folder


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def launcher(tmp_path_factory, text_corpus, prepared_data):
    server = harness.Launcher(tmp_path_factory.mktemp("logs"))
    server.warm(Run(tmp_path_factory.mktemp("warm"), text_corpus, prepared_data).cfg)
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(launcher, tmp_path_factory, text_corpus, prepared_data) -> Run:
    """The uninterrupted run every case is compared with."""
    run = Run(tmp_path_factory.mktemp("reference"), text_corpus, prepared_data)
    result = launcher.run(run.cfg)
    assert result.rc == 0, result.stderr[-3000:]
    assert intact_steps(run) == [2, 4, 6, 8]
    return run


@pytest.fixture
def new_run(tmp_path, text_corpus, prepared_data):
    """new_run(**sections) -> a fresh Run under tmp_path (same numerics as the reference)."""
    count = iter(range(100))

    def make(keep_last: int = 10, **sections) -> Run:
        return Run(tmp_path / f"r{next(count)}", text_corpus, prepared_data, keep_last=keep_last, **sections)

    return make


# ---------------------------------------------------------------------------------------------- damaged checkpoints
def _older_file(run: Run, name: str) -> None:
    shutil.copyfile(run.step_dir(4) / name, run.step_dir(6) / name)  # swapped in from an older step


DAMAGE = {
    "dense flipped": (lambda run: flip_byte(run.step_dir(6) / "dense.pt"), "dense.pt fails its sha256 check"),
    "dense from step 4": (lambda run: _older_file(run, "dense.pt"), "dense.pt fails its sha256 check"),
    "expert optim from step 4": (lambda run: _older_file(run, "experts_ep0_optim.pt"), "experts_ep0_optim.pt"),
    "experts truncated": (
        lambda run: os.truncate(run.step_dir(6) / "experts_ep0.pt", 100),
        "experts_ep0.pt has 100 bytes, meta.json recorded",
    ),
    "dense_optim missing": (lambda run: (run.step_dir(6) / "dense_optim.pt").unlink(), "dense_optim.pt is missing"),
    "meta.json deleted": (lambda run: (run.step_dir(6) / "meta.json").unlink(), "meta.json is missing"),
    "meta.json cut short": (
        lambda run: os.truncate(run.step_dir(6) / "meta.json", 300),
        "meta.json is damaged (not valid JSON",
    ),
    "meta.json from step 4": (
        lambda run: shutil.copyfile(run.step_dir(4) / "meta.json", run.step_dir(6) / "meta.json"),
        "fails its sha256 check",
    ),
    "meta.json edited": (
        lambda run: _edit_meta(run.step_dir(6) / "meta.json"),
        "meta.json fails its checksum",
    ),
}


def _edit_meta(path: Path) -> None:
    """A change that keeps meta.json valid JSON: one character of the base64 RNG state."""
    text = path.read_text()
    at = text.index('"rng"') + 20
    swapped = "B" if text[at] != "B" else "C"
    path.write_text(text[:at] + swapped + text[at + 1 :])


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_run_falls_back_bitwise(launcher, reference, new_run, damage):
    run = new_run()
    assert launcher.run(run.cfg, "--fault", "6:KILL").rc == -9
    hurt, problem = DAMAGE[damage]
    hurt(run)
    resumed = launcher.run(run.cfg)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert f"checkpoint {run.step_dir(6)} is damaged: " in resumed.stdout and problem in resumed.stdout, resumed.stdout
    assert f"resuming from {run.step_dir(4)}, the newest intact checkpoint" in resumed.stdout
    assert_bitwise(run, reference)


def test_when_no_checkpoint_verifies_the_message_lists_each_and_nothing_is_deleted(launcher, reference, new_run):
    run = new_run()
    assert launcher.run(run.cfg, "--fault", "4:KILL").rc == -9
    flip_byte(run.step_dir(4) / "dense.pt")
    os.truncate(run.step_dir(2) / "experts_ep0.pt", 10)
    failed = launcher.run(run.cfg)
    err = assert_clear_error(failed, 1, "no intact checkpoint to resume from", "Move the damaged checkpoint folder")
    assert f"{run.step_dir(4)}: dense.pt fails its sha256" in err and f"{run.step_dir(2)}: experts_ep0.pt has 10" in err
    assert sorted(p.name for p in run.ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
    for step in (2, 4):  # following the message: move them aside, rerun -> a fresh run (bitwise the reference)
        run.step_dir(step).rename(run.root / f"damaged_{step}")
    shutil.rmtree(run.root / "metrics")
    assert launcher.run(run.cfg).rc == 0
    assert_bitwise(run, reference)


# ---------------------------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("poisoned", [6, 5])
def test_non_finite_weights_are_never_saved_and_the_message_names_a_good_checkpoint(
    launcher, reference, new_run, poisoned
):
    run = new_run()
    failed = launcher.run(run.cfg, "--fault", f"{poisoned}:POISON")
    why = f"after step {poisoned} the weights hold NaN/Inf" if poisoned == 6 else "non-finite loss at step 6"
    assert_clear_error(failed, 1, why, f"Last good checkpoint: {run.step_dir(4)}")
    assert intact_steps(run) == [2, 4] and not list(run.ckpts.glob(".*tmp*"))
    for tensor in final_state(run.step_dir(4)).values():
        assert torch.isfinite(tensor.float()).all()
    resumed = launcher.run(run.cfg)
    assert resumed.rc == 0 and f"resumed from {run.step_dir(4)}" in resumed.stdout
    assert_bitwise(run, reference)


def test_optim_eps_zero_is_a_config_error(launcher, new_run):
    run = new_run(optim={"lr": 3e-3, "warmup": 2, "warmdown": 3, "eps": 0.0})
    assert_clear_error(launcher.run(run.cfg), 2, "`optim.eps` = 0.0")
    assert not run.ckpts.exists()


# ---------------------------------------------------------------------------------------------- metrics across kills
def test_metrics_hold_one_row_per_step_after_repeated_kills(launcher, reference, new_run):
    run = new_run(metrics={"dir": "metrics", "experiments_db": "runs.sqlite", "flush_every_s": 0.05})
    for fault, rc in (("3:KILLSTEP", -9), ("5:KILL", -9), ("6:KILLSAVE:meta", -9), ("7:KILLSTEP", -9)):
        result = launcher.run(run.cfg, "--fault", fault)
        assert result.rc == rc, (fault, result.stderr[-3000:])
        steps = [s for s, _ in run.loss_rows()]
        assert len(steps) == len(set(steps))  # never two rows of one step, even before the resume trims them
        last = max(intact_steps(run), default=0)
        assert set(range(1, last + 1)) <= set(steps), (fault, steps)  # a checkpoint implies its metrics
    assert launcher.run(run.cfg).rc == 0
    assert_bitwise(run, reference)
    registry = sqlite3.connect(run.root / "runs.sqlite").execute("SELECT status, last_step FROM runs").fetchall()
    assert registry == [("completed", STEPS)]


def test_a_run_restarted_within_its_first_second_keeps_one_row_per_step(launcher, reference, new_run):
    """Killed before its first checkpoint, restarted within the same second: the same run id, no second row."""
    run = new_run()
    clock = {"NMOE_TEST_CLOCK": "20250101-000000"}
    assert launcher.run(run.cfg, "--fault", "2:KILLSAVE:file", env=clock).rc == -9  # steps 1, 2 logged, no checkpoint
    assert [s for s, _ in run.loss_rows()] == [1, 2] and not intact_steps(run)
    assert launcher.run(run.cfg, env=clock).rc == 0
    assert run.run_id() == "run-20250101-000000-" + ckpt.read_meta(run.step_dir(STEPS))["fingerprint"][:6]
    assert_bitwise(run, reference)


# ---------------------------------------------------------------------------------------------- pruning
def test_a_kill_while_pruning_leaves_no_half_checkpoint(launcher, reference, new_run):
    run = new_run(keep_last=2)
    assert launcher.run(run.cfg, "--fault", "6:KILLSAVE:prune").rc == -9
    no_half_checkpoint(run)
    assert [p.name for p in ckpt.step_dirs(run.ckpts)] == ["step_00000004", "step_00000006"]
    assert len(list(run.ckpts.glob(".step_00000002.old-*"))) == 1  # renamed aside, half deleted
    resumed = launcher.run(run.cfg)
    assert resumed.rc == 0 and f"resumed from {run.step_dir(6)}" in resumed.stdout
    assert not list(run.ckpts.glob(".step_*"))
    assert [p.name for p in ckpt.step_dirs(run.ckpts)] == ["step_00000006", "step_00000008"]
    assert_bitwise(run, reference)


@pytest.mark.parametrize("point", ["file", "meta", "latest"])
def test_a_kill_inside_a_save_resumes_from_a_complete_checkpoint(launcher, reference, new_run, point):
    run = new_run()
    assert launcher.run(run.cfg, "--fault", f"6:KILLSAVE:{point}").rc == -9
    no_half_checkpoint(run)
    assert intact_steps(run) == ([2, 4, 6] if point == "latest" else [2, 4])
    resumed = launcher.run(run.cfg)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert not list(run.ckpts.glob(".step_*")) and not list(run.ckpts.glob(".latest*"))
    assert_bitwise(run, reference)


# ---------------------------------------------------------------------------------------------- two trainers
def test_two_trainers_on_one_run_the_second_refuses_naming_the_first(reference, new_run, tmp_path):
    """The same command started twice at once, as two real `python harness.py` processes."""
    run, gate = new_run(), tmp_path / "gate"
    cmd = [sys.executable, str(HERE / "harness.py"), str(run.cfg), "--fault", f"2:WAIT:{gate}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    both = [subprocess.Popen(cmd, cwd=run.root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in both):
            assert time.monotonic() < deadline, "neither trainer stopped"
            time.sleep(0.1)
        loser = next(p for p in both if p.poll() is not None)
        winner = next(p for p in both if p is not loser)
        out, err = loser.communicate()
        holder = f"{run.ckpts} is being trained right now by pid {winner.pid} on {socket.gethostname()}"
        assert_clear_error(harness.Result(loser.returncode, out, err), 1, holder)
        assert winner.poll() is None  # untouched: still waiting at step 2
        gate.touch()
        out, err = winner.communicate(timeout=300)
        assert winner.returncode == 0, err[-3000:]
    finally:
        for p in both:
            p.kill()
    assert_bitwise(run, reference)  # also: a process of its own ends exactly like the fork server's children


def test_the_lock_message_names_the_new_holder_not_its_dead_predecessor(tmp_path):
    import fcntl
    import threading

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file = tmp_path / ".lock"
    lock_file.write_text(f"pid {dead.stdout.strip()} on {socket.gethostname()}\n")  # left by a killed trainer
    fd = os.open(lock_file, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new trainer took the lock but has not written its line yet
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    late = threading.Timer(0.3, lambda: (os.ftruncate(fd, 0), os.pwrite(fd, me.encode(), 0)))
    late.start()
    try:
        with pytest.raises(ckpt.RunLocked, match=f"being trained right now by {me};"):
            ckpt.RunLock(tmp_path).acquire()
    finally:
        late.join()
        os.close(fd)


def test_a_lock_left_by_a_killed_trainer_does_not_block(launcher, reference, new_run):
    run = new_run()
    killed = launcher.start(run.cfg, "--fault", "4:KILL")
    assert killed.wait().rc == -9
    assert f"pid {killed.pid} on" in (run.ckpts / ".lock").read_text()  # its holder is gone
    resumed = launcher.run(run.cfg)
    assert resumed.rc == 0 and "resumed from" in resumed.stdout
    assert_bitwise(run, reference)


# ---------------------------------------------------------------------------------------------- bad input
def test_config_that_is_not_utf8_and_set_without_equals_are_one_line_exit_2(launcher, new_run):
    run = new_run()
    text = run.cfg.read_bytes()
    latin1 = run.root / "latin1.toml"
    latin1.write_bytes(text.replace(b'name = "synth"', b'name = "synth\xe9"'))
    err = assert_clear_error(launcher.run(latin1), 2, f"{latin1}: not UTF-8 text", "save the config as UTF-8")
    assert len(err.strip().splitlines()) == 1
    err = assert_clear_error(launcher.run(run.cfg, "--set", "train.steps"), 2, "--set 'train.steps'", "train.steps=")
    assert len(err.strip().splitlines()) == 1
    assert not (run.root / "ckpt").exists()


def test_shard_ids_beyond_the_vocabulary_name_the_shard_without_verify(launcher, new_run):
    model = dict(conftest_model(), vocab_size=320)  # the data's tokenizer has 384 tokens
    run = new_run(model=model, data={"verify_shards": False})
    err = assert_clear_error(launcher.run(run.cfg), 1, "the model has only 320 ids", "set the model vocab size")
    assert "shard " in err and ".npy holds token id" in err


def test_a_shard_changed_after_prep_names_the_shard_without_verify(launcher, new_run, tmp_path, prepared_data):
    import numpy as np

    data_dir = tmp_path / "data"
    shutil.copytree(prepared_data["data_dir"], data_dir)
    for shard in sorted(data_dir.rglob("train_*.npy")):  # same size and dtype, ids beyond the vocabulary
        tokens = np.load(shard)
        tokens[::7] = 60000
        np.save(shard, tokens)
    run = new_run(data={"data_dir": str(data_dir), "verify_shards": False})
    err = assert_clear_error(launcher.run(run.cfg), 1, "60000")
    assert "shard " in err and ".npy" in err


def conftest_model() -> dict:
    import tomllib

    return tomllib.loads(conftest.tiny_config(Path("/x"), Path("/x")))["model"]


def test_an_unwritable_data_dir_is_named_before_any_preparation(launcher, tmp_path, text_corpus):
    (tmp_path / "a_file").write_text("")
    data = {"data_dir": str(tmp_path / "a_file" / "data"), "tokenizer": str(tmp_path / "tok.json")}
    run = Run(tmp_path / "r", text_corpus, data)
    assert_clear_error(
        launcher.run(run.cfg), 1, "data.data_dir = ", "cannot write to", "Point data.data_dir at a writable location"
    )
    assert not (tmp_path / "tok.json").exists()  # nothing was prepared


@pytest.fixture
def read_only_copy(tmp_path):
    """read_only_copy(folder) -> a copy of folder that this process cannot write to: a read-only bind mount
    where mounting is allowed, file modes otherwise (which do not stop root: the probe below then fails)."""
    mounted, locked = [], []

    def copy(folder: str | Path) -> Path:
        ro = tmp_path / "read-only"
        shutil.copytree(folder, ro)
        bind = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True) if os.geteuid() == 0 else None
        if bind is not None and bind.returncode == 0:
            mounted.append(ro)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
        else:
            locked.extend([ro, *ro.rglob("*")])
            for path in locked:
                path.chmod(path.stat().st_mode & ~0o222)
        with pytest.raises(OSError):
            (ro / "probe").write_bytes(b"")
        return ro

    yield copy
    for ro in mounted:
        subprocess.run(["umount", "-l", str(ro)], check=True)
    for path in locked:
        path.chmod(path.stat().st_mode | 0o200)


def test_prepared_data_in_a_read_only_folder_trains(launcher, reference, tmp_path, text_corpus, prepared_data,
                                                    read_only_copy):  # fmt: skip
    data_dir = read_only_copy(prepared_data["data_dir"])
    run = Run(tmp_path / "r", text_corpus, {**prepared_data, "data_dir": str(data_dir)})
    result = launcher.run(run.cfg)
    assert "data.data_dir" not in result.stderr, result.stderr  # today: "cannot write to ... (Read-only ...)"
    assert result.rc == 0, result.stderr[-3000:]
    assert_bitwise(run, reference)


# ---------------------------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a tmpfs of `size` bytes mounted on tmp_path/disk where this machine allows it (root
    with mount rights) and NMOE_TEST_NO_TMPFS is unset, else None; unmounted at teardown."""
    disk, mounted = tmp_path / "disk", []

    def mount(size: int) -> Path | None:
        disk.mkdir()
        if os.geteuid() != 0 or not shutil.which("mount") or os.environ.get("NMOE_TEST_NO_TMPFS"):
            return None
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
        if done.returncode != 0:
            return None
        mounted.append(disk)
        return disk

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


SPACE = ("o space left on device", "disk is full", "disk I/O error")  # DuckDB, torch / SQLite on a full tmpfs
WROTE = ("could not write the step", "could not write the metrics file", "could not write the experiment registry")


@pytest.mark.parametrize("where", ["checkpoints", "whole run folder"])
def test_a_full_disk_keeps_what_was_saved_and_a_rerun_ends_bitwise(launcher, reference, tmp_path, text_corpus,
                                                                   prepared_data, small_disk, where):  # fmt: skip
    """A real full disk (a small tmpfs) where this machine lets the test mount one, else a simulated one."""
    ckpt_bytes = sum(f.stat().st_size for f in reference.step_dir(2).iterdir())
    if where == "checkpoints":  # step 2 fits, step 4 does not
        disk = small_disk(ckpt_bytes + ckpt_bytes // 2 + (64 << 10))
        run = Run(
            tmp_path / "r",
            text_corpus,
            prepared_data,
            checkpoint={"dir": str(tmp_path / "disk"), "save_every": SAVE_EVERY, "keep_last": 10},
        )
        fault = "4:ENOSPC:file"
    else:  # checkpoints, metrics and registry share the disk: whichever write comes first fails
        disk = small_disk(ckpt_bytes + (1 << 20))
        run = Run(tmp_path / "disk", text_corpus, prepared_data)
        fault = "4:ENOSPC:metrics"
    failed = launcher.run(run.cfg, *([] if disk else ["--fault", fault]))
    err = assert_clear_error(failed, 1)
    assert any(w in err for w in WROTE) and any(s in err for s in SPACE), err
    if "could not write the step 4" in err:
        assert f"Last good checkpoint: {run.step_dir(2)}" in err
    if where == "checkpoints":
        assert "could not write the step 4 checkpoint" in err and intact_steps(run) == [2]
    no_half_checkpoint(run)
    assert not list(run.ckpts.glob(".step_*"))
    if disk:  # the space comes back
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
    resumed = launcher.run(run.cfg)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert_bitwise(run, reference)


@pytest.mark.parametrize("point", ["file", "meta", "latest", "registry", "metrics"])
def test_a_simulated_full_disk_at_each_point_of_a_save(launcher, reference, new_run, point):
    run = new_run()
    failed = launcher.run(run.cfg, "--fault", f"4:ENOSPC:{point}")
    if point in ("file", "meta", "latest"):
        wrote, last_good = f"could not write the step 4 checkpoint under {run.ckpts}", f"{run.step_dir(2)}."
        needles = (wrote, "o space left on device", f"Last good checkpoint: {last_good}")
    else:
        needles = (
            {"registry": "could not write the experiment registry", "metrics": "could not write the metrics"}[point],
            "disk is full" if point == "registry" else "No space left on device",
            "rerun the same command",
        )
    assert_clear_error(failed, 1, *needles)
    no_half_checkpoint(run)
    assert not list(run.ckpts.glob(".step_*"))
    assert 2 in intact_steps(run)
    resumed = launcher.run(run.cfg)
    assert resumed.rc == 0, resumed.stderr[-3000:]
    assert not list(run.ckpts.glob(".latest*"))
    assert_bitwise(run, reference)


# ---------------------------------------------------------------------------------------------- records
def test_a_damaged_experiment_registry_is_one_line(launcher, new_run):
    run = new_run()
    (run.root / "runs.sqlite").write_bytes(b"this is not a database" * 100)
    err = assert_clear_error(launcher.run(run.cfg), 1, f"the experiment registry {run.root / 'runs.sqlite'}")
    assert "move it aside" in err and len(err.strip().splitlines()) == 1


def _zero_after_headers(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:12288] + bytes(len(data) - 12288))  # DuckDB's headers intact, every block zeroed


@pytest.mark.parametrize("damage", ["garbage", "blocks zeroed"])
def test_a_damaged_metrics_file_on_resume_names_the_file_and_the_remedy(launcher, reference, new_run, capsys, damage):
    run = new_run()
    assert launcher.run(run.cfg, "--fault", "4:KILL").rc == -9
    metrics = run.root / "metrics" / run.run_id() / "rank_0.duckdb"
    if damage == "garbage":
        metrics.write_bytes(b"\0garbage" * 4096)
    else:
        _zero_after_headers(metrics)
    err = assert_clear_error(launcher.run(run.cfg), 1, str(metrics), "Move it aside")
    assert len(err.strip().splitlines()) == 1
    from nmoe.metrics.cli import main as metrics_main

    shown = metrics_main(["show", run.run_id(), "--metrics-dir", str(run.root / "metrics"), "--db", "none.sqlite"])
    out = capsys.readouterr()
    assert shown == 2 and str(metrics) in out.err and "Traceback" not in out.err, out.err
    metrics.rename(metrics.with_name("damaged.duckdb"))  # the remedy: the run goes on, its new rows in a new file
    resumed = launcher.run(run.cfg)
    assert resumed.rc == 0 and "resumed from" in resumed.stdout
    assert [s for s, _ in run.loss_rows()] == [5, 6, 7, 8]
    assert run.loss_rows() == reference.loss_rows()[4:]
    mine, ref = final_state(run.step_dir(STEPS)), final_state(reference.step_dir(STEPS))
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------------------------- --extend-steps
def test_extend_steps_trains_more_and_a_rerun_resumes_to_the_same_end(launcher, reference, new_run):
    straight, killed = new_run(), new_run()
    for run in (straight, killed):
        assert launcher.run(run.cfg).rc == 0
    longer = launcher.run(straight.cfg, "--extend-steps", "4")
    assert longer.rc == 0, longer.stderr[-3000:]
    assert "extending the run to 12 steps: steps after 8 use the schedule's final learning rate" in longer.stdout
    assert launcher.run(killed.cfg, "--extend-steps", "4", "--fault", "10:KILL").rc == -9
    again = launcher.run(killed.cfg, "--extend-steps", "4")  # the same command
    assert again.rc == 0 and f"resumed from {killed.step_dir(10)}" in again.stdout
    assert ckpt.read_meta(killed.step_dir(12))["state"]["extra_steps"] == 4
    assert straight.loss_rows() == killed.loss_rows() and [s for s, _ in killed.loss_rows()] == list(range(1, 13))
    assert straight.loss_rows()[:STEPS] == reference.loss_rows()
    a, b = final_state(straight.step_dir(12)), final_state(killed.step_dir(12))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = launcher.run(killed.cfg)  # without the flag: the recorded end stands
    assert plain.rc == 0 and "already finished at step 12" in plain.stdout
    assert [s for s, _ in killed.loss_rows()] == list(range(1, 13))


# ---------------------------------------------------------------------------------------------- the seeded suite
def _corrupt(run: Run, rng: random.Random) -> str:
    """Damage one file of a checkpoint (mostly the newest), or the `latest` pointer; returns what was done."""
    folders = ckpt.step_dirs(run.ckpts)
    folder = folders[-1] if rng.random() < 0.7 else rng.choice(folders)
    files = sorted(folder.iterdir())
    how = rng.choice(["flip", "truncate", "swap", "delete", "latest"])
    if how == "latest" or not files:
        (run.ckpts / ckpt.LATEST).write_bytes(bytes(rng.randrange(256) for _ in range(12)))
        return "garbage in latest"
    target = rng.choice(files)
    if how == "flip":
        flip_byte(target, rng.random())
    elif how == "truncate":
        os.truncate(target, rng.randrange(target.stat().st_size))
    elif how == "delete":
        target.unlink()
    else:
        older = [d for d in folders if d != folder and (d / target.name).exists()]
        if not older:
            return "nothing (no other checkpoint to swap a file from)"
        shutil.copyfile(rng.choice(older) / target.name, target)
    return f"{how} {target.relative_to(run.root)}"


def _random_fault(rng: random.Random) -> tuple[list[str], set[int]]:
    """(extra CLI args, the exit statuses they may end with)."""
    step, save_step = rng.randint(1, STEPS), rng.choice(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    kind = rng.choice(["KILL", "KILLSTEP", "KILLSAVE", "ENOSPC", "TERM", "POISON"])
    if kind == "KILLSAVE":
        return ["--fault", f"{save_step}:KILLSAVE:{rng.choice(['file', 'meta', 'latest', 'prune'])}"], {-9}
    if kind == "ENOSPC":
        return ["--fault", f"{save_step}:ENOSPC:{rng.choice(['file', 'meta', 'latest', 'registry', 'metrics'])}"], {1}
    if kind == "TERM":
        return ["--fault", f"{step}:TERM"], {143}
    if kind == "POISON":
        return ["--fault", f"{step}:POISON"], {1}
    return ["--fault", f"{step}:{kind}"], {-9}


@pytest.mark.parametrize("seed", range(int(os.environ.get("NMOE_FAULT_SEEDS", "12"))))
def test_random_faults_end_bitwise_or_with_one_clear_message(launcher, reference, new_run, seed):
    """A seeded sequence of faults on one run, then a plain rerun: it ends bitwise equal to the reference.

    Each faulty process must end killed, interrupted, completed, or with exit 1 and one clear message; after
    each, nothing saved is lost (the newest intact checkpoint never goes back) and no folder is half written.
    """
    rng = random.Random(seed)
    run = new_run(keep_last=rng.choice([2, 3, 10]))
    log, damaged = [], set()

    def check(result, allowed: set[int]) -> None:
        assert result.rc in allowed | {0, 1}, (log, result.rc, result.stderr[-3000:])  # 0: the fault's step was past
        if result.rc == 1:
            err = assert_clear_error(result, 1)
            if "no intact checkpoint" in err:  # every checkpoint was damaged: do what the message says
                for folder in ckpt.step_dirs(run.ckpts):
                    folder.rename(run.root / f"aside_{len(log)}_{folder.name}")
                shutil.rmtree(run.root / "metrics", ignore_errors=True)
            else:
                assert 1 in allowed or "is being trained right now" in err, (log, err)

    for _ in range(rng.randint(2, 5)):
        action = rng.choice(["fault", "fault", "fault", "kill at random", "corrupt", "concurrent"])
        before = intact_steps(run)
        if action == "corrupt" and before:
            what = _corrupt(run, rng)
            damaged.add(what.split(" ", 1)[-1])
            log.append(f"corrupt: {what}")
            continue
        if action == "concurrent":
            log.append("two at once")
            results = [r.wait() for r in [launcher.start(run.cfg) for _ in range(2)]]
            for result in results:
                check(result, {0})
        elif action == "kill at random":
            started, delay = launcher.start(run.cfg), rng.uniform(0.0, 1.5)
            time.sleep(delay)
            os.kill(started.pid, 9)
            log.append(f"SIGKILL after {delay:.2f}s")
            check(started.wait(), {-9})
        else:
            args, allowed = _random_fault(rng)
            log.append(" ".join(args))
            check(launcher.run(run.cfg, *args), allowed)
        after = intact_steps(run)
        if not any("aside_" in p.name for p in run.root.iterdir()):
            assert max(after, default=0) >= max(before, default=0), (log, before, after)
        for folder in ckpt.step_dirs(run.ckpts):  # a save publishes complete folders only
            assert (folder / ckpt.META).is_file() or str(folder.relative_to(run.root) / ckpt.META) in damaged, log
    final = launcher.run(run.cfg)
    check(final, {0})
    if final.rc == 1:  # the remedy was applied: start again
        final = launcher.run(run.cfg)
    assert final.rc == 0, (log, final.stderr[-3000:])
    assert_bitwise(run, reference)
