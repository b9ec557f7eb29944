"""Hugging Face export: transformers' DeepseekV3ForCausalLM computes what the nmoe model computes."""

from __future__ import annotations

import json

import pytest
import torch

from nmoe.model import ModelConfig
from nmoe.model.layers import rope_frequencies
from nmoe.train import export_hf
from nmoe.train.export_hf import ExportError, check_exportable, export_model, export_tokenizer, main

transformers = pytest.importorskip("transformers")  # a dev-group dependency: always present in CI


def as_float64(model):
    """The model in float64, RoPE tables included at float64 precision (they are stored as float32)."""
    model = model.double()
    cfg = model.cfg
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), rope_frequencies(model.rope_dim, cfg))
    model.rope_cos.copy_(angles.cos())
    model.rope_sin.copy_(angles.sin())
    return model


def load_hf(path, dtype=torch.float64, **kw):
    return transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


def randomise_expert_bias(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)


IDX = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
CASES = {
    "mla-moe": {},
    "q_lora+no-route-norm+no-shared": dict(
        q_lora_rank=12, route_norm=False, n_shared_experts=0, n_groups=1, topk_groups=1
    ),
    "yarn": dict(rope_factor=4.0, original_seq_len=16, mscale=0.7, beta_fast=8.0),
    "dense": dict(n_dense_layers=3),
}


@pytest.mark.parametrize("overrides", list(CASES.values()), ids=list(CASES))
def test_hf_logits_equal_nmoe_logits(random_model, tmp_path, overrides):
    model = random_model(seed=5, **overrides)
    randomise_expert_bias(model)
    model = as_float64(model)
    export_model(model.cfg, model.state_dict(), tmp_path, bos_id=0, dtype=torch.float32)
    hf = load_hf(tmp_path, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        ours, theirs = model(IDX).logits.double(), hf(IDX).logits
    assert ours.abs().max() > 1.0  # logits far from zero: the comparison means something
    # HF keeps RoPE, RMSNorm, the router and the softmax in float32 even in a float64 model
    torch.testing.assert_close(theirs, ours, atol=5e-6, rtol=0)


def test_the_rope_row_order_matters(random_model, tmp_path, monkeypatch):
    model = as_float64(random_model(seed=5))
    monkeypatch.setattr(export_hf, "_interleave_rope", lambda rows: rows)  # what a plain weight copy would do
    export_model(model.cfg, model.state_dict(), tmp_path, bos_id=0, dtype=torch.float32)
    hf = load_hf(tmp_path, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        assert (hf(IDX).logits - model(IDX).logits.double()).abs().max() > 1e-2


def test_bf16_export_loads_with_transformers_defaults(random_model, tmp_path):
    model = random_model(seed=6)
    files = export_model(model.cfg, model.state_dict(), tmp_path, bos_id=0, dtype=torch.bfloat16)
    assert [f.name for f in files] == ["config.json", "generation_config.json", "model.safetensors"]
    hf = load_hf(tmp_path, dtype=torch.float32)  # default attention and expert kernels
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))  # the same bf16-rounded weights on the nmoe side
        torch.testing.assert_close(hf(IDX).logits, model(IDX).logits, atol=2e-4, rtol=0)


def test_large_models_are_sharded_with_an_index(random_model, tmp_path, monkeypatch):
    model = random_model(seed=8)
    monkeypatch.setattr(export_hf, "MAX_SHARD_BYTES", 40_000)
    files = export_model(model.cfg, model.state_dict(), tmp_path, bos_id=0, dtype=torch.float32)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert not list(tmp_path.glob(".part-*")) and (tmp_path / "model.safetensors.index.json") in files
    hf = load_hf(tmp_path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, model(IDX).logits, atol=1e-4, rtol=0)


def test_safetensors_files_and_config_follow_deepseek_v3(random_model, tmp_path):
    from safetensors import safe_open

    model = random_model(seed=7, q_lora_rank=12)
    export_model(model.cfg, model.state_dict(), tmp_path, bos_id=3, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["rope_interleave"] is True
    assert (config["first_k_dense_replace"], config["n_group"], config["routed_scaling_factor"]) == (1, 2, 2.0)
    assert config["bos_token_id"] == config["eos_token_id"] == 3 and config["num_nextn_predict_layers"] == 0
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
        w_up = model.blocks[1].ffn.w_up.detach()
        torch.testing.assert_close(f.get_tensor("model.layers.1.mlp.experts.5.up_proj.weight"), w_up[5, :, 16:].t())
        bias = f.get_tensor("model.layers.2.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.self_attn.q_a_proj.weight" in names
    assert len([n for n in names if ".experts." in n]) == 2 * 8 * 3


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(attn="sdpa"), "model.attn"),
        (dict(attn_local="swa", attn_global_every=2), "model.attn_local"),
        (dict(capacity_factor=1.25), "model.capacity_factor"),
        (dict(score_func="softmax"), "model.score_func"),
        (dict(norm_eps=1e-5), "model.norm_eps"),
        (dict(n_routed_experts=4, n_groups=4, topk_groups=2, top_k=2), "model.n_groups"),
    ],
)
def test_what_deepseek_v3_cannot_express_is_refused_naming_the_key(mla_model, overrides, key):
    with pytest.raises(ExportError, match=key.replace(".", r"\.")):
        check_exportable(ModelConfig(**{**mla_model, **overrides}))


def test_tokenizer_export_tokenizes_like_nmoe(small_tokenizer, tmp_path):
    files = export_tokenizer(small_tokenizer, tmp_path)
    assert [f.name for f in files] == ["tokenizer.json", "tokenizer_config.json"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Question: what is the country of the answer? Answer: France."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == small_tokenizer.encode(text)
    assert hf_tok.convert_tokens_to_ids(hf_tok.bos_token) == small_tokenizer.bos_id


def test_cli_exports_a_checkpoint_that_transformers_runs(trained_run, tmp_path, capsys):
    from nmoe.train.inference import load_model

    run_dir, _ = trained_run
    assert main([str(run_dir), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert "config.json" in capsys.readouterr().out
    _, model, tok = load_model(run_dir, "cpu")
    hf = load_hf(tmp_path / "hf", dtype=torch.float32)
    ids = torch.tensor([[tok.bos_id, *tok.encode("the expert router")]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("the expert router", add_special_tokens=False)["input_ids"] == tok.encode("the expert router")
    capsys.readouterr()  # transformers' loading progress
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("nmoe-export: error:")
