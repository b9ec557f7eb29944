"""Checkpoint files on disk: retention, the `latest` pointer, crash leftovers, optimizer state."""

import pytest
import torch

from nmoe.train import checkpoint as ckpt


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
        self.experts = torch.nn.Parameter(torch.ones(2, 2))


def model_and_optimizer(foreach: bool):
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=foreach)
    model.w.grad, model.experts.grad = torch.ones(2, 3), torch.ones(2, 2)
    opt.step()
    return model, opt


def save(root, step, model, opt, keep_last=2):
    return ckpt.save_checkpoint(
        root, step, model, opt, {"tag": step}, is_expert=lambda n: n == "experts", keep_last=keep_last
    )


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


def test_a_failed_save_leaves_no_temporary_and_stale_ones_are_removed(tmp_path, monkeypatch):
    model, opt = model_and_optimizer(foreach=False)
    good = save(tmp_path, 2, model, opt)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        if str(f).endswith("dense_optim.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save(tmp_path, 4, model, opt)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert ckpt.find_latest(tmp_path) == good
    # what a SIGKILL in the middle of a save leaves behind
    (tmp_path / ".step_00000006.tmp-4242").mkdir()
    (tmp_path / ".step_00000006.tmp-4242" / "dense.pt").write_bytes(b"half")
    (tmp_path / ".step_00000002.old-4242").mkdir()
    (tmp_path / ".latest.tmp-4242").write_text("step_00000006\n")
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert len(removed) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]


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
    ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert fresh_opt.param_groups[0]["foreach"] is True
    assert isinstance(fresh_opt.param_groups[0]["betas"], tuple)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key])


def test_read_meta_names_a_missing_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"does not exist.*'auto'"):
        ckpt.read_meta(tmp_path / "nope" / "step_00000001")
    with pytest.raises(ckpt.CheckpointError, match=r"not a checkpoint \(no meta.json\)"):
        ckpt.read_meta(tmp_path)
