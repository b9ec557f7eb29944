"""Loading checkpoints for use, and KV-cached generation against the full forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nmoe.train import inference
from nmoe.train.sample import generate, main


def full_forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation recomputing the whole sequence each step (no cache)."""
    seq = list(prompt)
    # with autograd on, CPU sliding-window layers use the dense-mask path (no flex block mask built per length)
    with torch.enable_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"q_lora_rank": 12},
        {"attn": "sdpa", "n_kv_heads": 2, "attn_local": "swa", "attn_global_every": 2, "attn_local_window": 5},
    ],
    ids=["mla", "mla+q_lora", "sdpa+swa"],
)
def test_greedy_generation_equals_argmax_of_the_full_forward(random_model, overrides):
    model = random_model(seed=1, **overrides)
    prompt = [1, 17, 99, 3, 250]
    assert generate(model, prompt, 12) == full_forward_greedy(model, prompt, 12)  # past the window of 5


def test_sampling_is_seeded_and_top_k_one_is_greedy(random_model):
    model = random_model(seed=2, scale=2.0)
    prompt = [5, 6, 7]
    a = generate(model, prompt, 16, temperature=1.0, seed=11)
    assert a == generate(model, prompt, 16, temperature=1.0, seed=11)
    assert any(generate(model, prompt, 16, temperature=1.0, seed=s) != a for s in range(12, 16))
    assert generate(model, prompt, 16, temperature=1.5, top_k=1, seed=3) == generate(model, prompt, 16)


def test_top_k_restricts_the_draw_to_the_k_most_likely_tokens(random_model):
    model = random_model(seed=4, scale=1.0)
    prompt = [9, 8]
    with torch.no_grad():
        allowed = set(model(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist())
    firsts = {generate(model, prompt, 1, temperature=5.0, top_k=3, seed=s)[0] for s in range(40)}
    assert firsts <= allowed and len(firsts) > 1


def test_generation_stops_at_the_stop_token_and_checks_lengths(random_model):
    model = random_model(seed=1)
    greedy = generate(model, [1, 2, 3], 10)
    stop = greedy[3]
    out = generate(model, [1, 2, 3], 10, stop_id=stop)
    assert out == greedy[: greedy.index(stop) + 1]
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [1] * 60, 5)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 5)


def test_generation_leaves_router_buffers_untouched(random_model):
    model = random_model()
    before = {n: b.clone() for n, b in model.named_buffers()}
    generate(model, [1, 2], 5, temperature=1.0)
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


# ---------------------------------------------------------------------------- checkpoints
def test_load_model_equals_the_trained_model(trained_run):
    run_dir, trainer = trained_run
    cfg, model, tok = inference.load_model(run_dir, "cpu")  # a run folder: its latest checkpoint
    assert cfg.fingerprint == trainer.cfg.fingerprint and not model.training
    trained = trainer.model.state_dict()
    assert all(torch.equal(t, trained[n]) for n, t in model.state_dict().items())
    step_dir = inference.resolve_checkpoint(run_dir)
    assert step_dir.name == "step_00000004"
    _, again, _ = inference.load_model(step_dir, "cpu")
    idx = torch.tensor([[tok.bos_id, *tok.encode("the expert router")]])
    with torch.no_grad():
        assert torch.equal(model(idx).logits, again(idx).logits)


def test_tokenizer_falls_back_to_the_prepared_dataset_copy(trained_run):
    _, trainer = trained_run
    cfg = trainer.cfg
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="/nonexistent/tok.json"))
    assert inference.find_tokenizer(moved).sha256 == inference.find_tokenizer(cfg).sha256
    gone = dataclasses.replace(moved, data=dataclasses.replace(moved.data, data_dir="/nonexistent"))
    with pytest.raises(inference.LoadError, match="--tokenizer"):
        inference.find_tokenizer(gone)


def test_load_errors_say_what_to_pass(tmp_path):
    with pytest.raises(inference.LoadError, match="does not exist"):
        inference.load_model(tmp_path / "nope", "cpu")
    with pytest.raises(inference.LoadError, match="no complete checkpoint"):
        inference.load_model(tmp_path, "cpu")


def test_cli_streams_a_continuation(trained_run, capsys):
    run_dir, _ = trained_run
    argv = [str(run_dir), "--prompt", "the expert", "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*argv, "--temperature", "0.9", "--top-k", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the expert") and out.endswith("\n")
    assert main([*argv, "--temperature", "0.9", "--top-k", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out == out  # same seed, same text
    assert main([*argv[:3], "--max-new-tokens", "100", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "nmoe-sample: error:" in err and "max_seq_len" in err
