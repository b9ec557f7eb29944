"""Checkpoint files on disk: retention, `latest`, crash leftovers, checksums, expert re-sharding, the run lock."""

import os
import subprocess
import sys

import pytest
import torch

from nmoe.train import checkpoint as ckpt


class Tiny(torch.nn.Module):
    """A dense matrix and a routed-expert tensor [E_local, 2] of expert-parallel rank `ep_rank` of `ep_size`."""

    def __init__(self, ep_rank=0, ep_size=1, n_experts=4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
        per = n_experts // ep_size
        first = ep_rank * per
        self.experts = torch.nn.Parameter(torch.arange(first, first + per, dtype=torch.float32)[:, None].repeat(1, 2))


def shard(ep_rank=0, ep_size=1, n_experts=4):
    return ckpt.Shard(lambda n: n == "experts", ep_rank, ep_size, n_experts)


def model_and_optimizer(foreach: bool, ep_rank=0, ep_size=1):
    model = Tiny(ep_rank, ep_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=foreach)
    model.w.grad = torch.ones(2, 3)
    model.experts.grad = model.experts.detach().clone() + 1
    opt.step()
    return model, opt


def save(root, step, model, opt, keep_last=2):
    tmp = ckpt.temporary_dir(root, step)
    files = ckpt.write_shard_files(tmp, model, opt, shard(), writes_dense=True)
    return ckpt.publish(root, tmp, step, {"files": files}, keep_last)


def steps_on_disk(root):
    return sorted(int(p.name[5:]) for p in root.glob("step_*"))


def test_keep_last_never_prunes_what_latest_names_after_a_rollback(tmp_path):
    model, opt = model_and_optimizer(foreach=False)
    for step in (4, 8, 12):
        save(tmp_path, step, model, opt)
    assert steps_on_disk(tmp_path) == [8, 12]
    # resumed from an explicit older checkpoint: the next save is older than what is on disk
    saved = save(tmp_path, 6, model, opt)
    assert saved.is_dir() and ckpt.find_latest(tmp_path) == saved
    assert (tmp_path / "latest").read_text().strip() == "step_00000006"
    save(tmp_path, 7, model, opt)
    assert steps_on_disk(tmp_path) == [6, 7, 8, 12]  # later steps are overwritten as the run reaches them
    save(tmp_path, 8, model, opt)
    assert steps_on_disk(tmp_path) == [7, 8, 12]


def test_steps_sort_numerically_past_eight_digits(tmp_path):
    model, opt = model_and_optimizer(foreach=False)
    save(tmp_path, 99_999_999, model, opt)
    newest = save(tmp_path, 100_000_000, model, opt)
    (tmp_path / "latest").unlink()  # the fallback scan must agree
    assert ckpt.find_latest(tmp_path) == newest
    save(tmp_path, 100_000_001, model, opt)
    assert steps_on_disk(tmp_path) == [100_000_000, 100_000_001]


def test_a_full_disk_is_an_oserror_naming_the_cause_and_stale_temporaries_are_removed(tmp_path, monkeypatch):
    model, opt = model_and_optimizer(foreach=False)
    good = save(tmp_path, 2, model, opt)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        if str(f).endswith("dense_optim.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OSError, match="no space left on device"):
        save(tmp_path, 4, model, opt)
    monkeypatch.undo()
    assert ckpt.find_latest(tmp_path) == good
    # what a SIGKILL in the middle of a save or a prune leaves behind
    (tmp_path / ".step_00000004.tmp").mkdir(exist_ok=True)
    (tmp_path / ".step_00000004.tmp" / "dense.pt").write_bytes(b"half")
    (tmp_path / ".step_00000001.old-4242").mkdir()
    (tmp_path / ".latest.tmp-4242").write_text("step_00000006\n")
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert len(removed) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]


def test_a_kill_while_pruning_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    model, opt = model_and_optimizer(foreach=False)
    save(tmp_path, 1, model, opt)
    save(tmp_path, 2, model, opt)

    def killed(path, *a, **k):
        raise SystemExit("SIGKILL")  # the process dies inside the delete

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        save(tmp_path, 3, model, opt)
    monkeypatch.undo()
    assert steps_on_disk(tmp_path) == [2, 3]  # step 1 was renamed aside before anything was deleted
    assert [p.name for p in tmp_path.glob(".step_00000001.old-*")]
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_saving_a_step_again_replaces_it(tmp_path):
    model, opt = model_and_optimizer(foreach=False)
    save(tmp_path, 3, model, opt)
    with torch.no_grad():
        model.w.add_(1.0)
    path = save(tmp_path, 3, model, opt)
    assert torch.equal(torch.load(path / "dense.pt")["w"], model.w.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]


def test_optimizer_state_round_trips_but_group_settings_stay_this_runs(tmp_path):
    model, opt = model_and_optimizer(foreach=False)
    path = save(tmp_path, 1, model, opt)
    fresh = Tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, foreach=True)
    ckpt.load_shard(path, ckpt.read_meta(path), fresh, fresh_opt, shard())
    assert fresh_opt.param_groups[0]["foreach"] is True
    assert isinstance(fresh_opt.param_groups[0]["betas"], tuple)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key])


@pytest.mark.parametrize("saved_ep,loaded_ep", [(2, 1), (1, 4), (4, 2), (2, 4)])
def test_experts_reshard_exactly_by_global_index(tmp_path, saved_ep, loaded_ep):
    one, one_opt = model_and_optimizer(foreach=False)  # the whole model: reference for every slice
    tmp = ckpt.temporary_dir(tmp_path, 5)
    files = {}
    for r in range(saved_ep):
        model, opt = model_and_optimizer(foreach=False, ep_rank=r, ep_size=saved_ep)
        files.update(ckpt.write_shard_files(tmp, model, opt, shard(r, saved_ep), writes_dense=r == 0))
    path = ckpt.publish(tmp_path, tmp, 5, {"files": files}, keep_last=1)
    meta = ckpt.read_meta(path)
    for r in range(loaded_ep):
        fresh = Tiny(r, loaded_ep)
        fresh.experts.data.fill_(-1)
        opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        ckpt.load_shard(path, meta, fresh, opt, shard(r, loaded_ep))
        per = 4 // loaded_ep
        want = one.experts.detach()[r * per : (r + 1) * per]
        assert torch.equal(fresh.experts.detach(), want)
        state, want_state = opt.state[fresh.experts], one_opt.state[one.experts]
        assert torch.equal(state["exp_avg"], want_state["exp_avg"][r * per : (r + 1) * per])
        assert torch.equal(state["step"], want_state["step"])


def test_checksums_find_flipped_truncated_and_swapped_files(tmp_path):
    model, opt = model_and_optimizer(foreach=False)
    older = save(tmp_path, 1, model, opt, keep_last=3)
    with torch.no_grad():
        model.w.add_(1)
    path = save(tmp_path, 2, model, opt, keep_last=3)
    meta = ckpt.read_meta(path)
    names = ckpt.files_to_check(meta)
    assert ckpt.verify_files(path, meta, names) is None
    dense = path / "dense.pt"
    original = dense.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    dense.write_bytes(bytes(flipped))
    assert "dense.pt fails its sha256 check" in ckpt.verify_files(path, meta, names)
    dense.write_bytes(original[:-10])
    assert "dense.pt has" in ckpt.verify_files(path, meta, names) and "truncated" in ckpt.verify_files(
        path, meta, names
    )
    dense.write_bytes((older / "dense.pt").read_bytes())  # a file copied in from an older step
    assert "dense.pt" in ckpt.verify_files(path, meta, names)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="meta.json is damaged"):
        ckpt.read_meta(path)


def test_nonfinite_tensors_are_named():
    model, _ = model_and_optimizer(foreach=False)
    assert ckpt.nonfinite_tensors(model) == []
    with torch.no_grad():
        model.experts[0, 1] = float("nan")
    assert ckpt.nonfinite_tensors(model) == ["experts"]


def test_the_run_lock_refuses_a_second_trainer_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from nmoe.train.checkpoint import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.RunLocked, match=rf"being trained right now by pid {holder.pid} on "):
            ckpt.RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = ckpt.RunLock(tmp_path)  # a killed holder leaves no stale lock
    lock.acquire()
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    lock.release()


def test_read_meta_names_a_missing_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"does not exist.*'auto'"):
        ckpt.read_meta(tmp_path / "nope" / "step_00000001")
    with pytest.raises(ckpt.CheckpointError, match=r"not a checkpoint \(no meta.json\)"):
        ckpt.read_meta(tmp_path)
