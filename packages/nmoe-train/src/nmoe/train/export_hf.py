"""Export an nmoe checkpoint as a Hugging Face DeepSeek-V3 model (safetensors + config.json).

The result loads with transformers' DeepseekV3ForCausalLM (so lm-eval-harness and vLLM can use it).
Weight layout: the per-expert names of DeepSeek-V3's own checkpoints (transformers >= 5 fuses them
on load); nmoe's fused matrices are split back out (wqkv_a -> q / kv_a, w13 -> gate / up, w_up ->
per-expert gate / up, transposed to [out, in]); the RoPE rows of the query and of k_rope are
reordered from nmoe's half-split pairs (i, i + d/2) to DeepSeek's interleaved pairs (2i, 2i + 1),
so the exported model uses `rope_interleave = true` like DeepSeek-V3 itself.

Refused, naming the config key: what DeepSeek-V3 cannot express (sdpa/GQA attention, sliding-window
layers, capacity dropping, softmax routing, a non-default norm epsilon on the MLA latents, expert
groups of one expert).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from nmoe.model import ModelConfig, init_rules

HF_LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3Attention builds q_a/kv_a_layernorm with the default eps
MAX_SHARD_BYTES = 4 << 30
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class ExportError(ValueError):
    """The model cannot be written as a Hugging Face DeepSeek-V3 checkpoint; the message names the config key."""


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ExportError naming the first config key DeepSeek-V3 cannot express."""
    if cfg.attn != "mla":
        raise ExportError(
            f"model.attn = {cfg.attn!r}: Hugging Face DeepSeek-V3 has only multi-head latent attention; "
            "only model.attn = 'mla' models can be exported"
        )
    local = [i for i in range(cfg.n_layers) if not cfg.is_global_layer(i)]
    if local:
        raise ExportError(
            f"model.attn_local = {cfg.attn_local!r} makes layers {local} sliding-window; DeepSeek-V3 has no "
            "sliding-window layers (export needs model.attn_local = 'none')"
        )
    if cfg.capacity_factor > 0:
        raise ExportError(
            f"model.capacity_factor = {cfg.capacity_factor}: DeepSeek-V3 routes dropless; a model trained with "
            "capacity dropping would compute differently there"
        )
    if cfg.has_moe and cfg.score_func != "sigmoid":
        raise ExportError(f"model.score_func = {cfg.score_func!r}: DeepSeek-V3's router is sigmoid-only")
    if cfg.norm_eps != HF_LATENT_NORM_EPS:
        raise ExportError(
            f"model.norm_eps = {cfg.norm_eps}: transformers' DeepSeek-V3 fixes the MLA latent norms' epsilon at "
            f"{HF_LATENT_NORM_EPS}, so only models trained with that epsilon export exactly"
        )
    if cfg.has_moe and cfg.n_routed_experts // cfg.n_groups < 2:
        raise ExportError(
            f"model.n_groups = {cfg.n_groups} leaves one expert per group; DeepSeek-V3 scores a group by its "
            "best two experts"
        )


def hf_config(cfg: ModelConfig, bos_id: int | None, dtype: torch.dtype) -> dict:
    """config.json for transformers' DeepseekV3ForCausalLM (legacy rope keys, read by transformers 4/5 and vLLM)."""
    rope_scaling = None
    if cfg.yarn_enabled:
        rope_scaling = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "mscale": cfg.mscale,  # with mscale_all_dim equal: cos/sin unscaled, softmax scale * mscale^2
            "mscale_all_dim": cfg.mscale,
        }
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim or cfg.moe_inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.top_k,
        "routed_scaling_factor": cfg.route_scale,
        "norm_topk_prob": cfg.route_norm,
        "n_group": cfg.n_groups,
        "topk_group": cfg.topk_groups,
        "first_k_dense_replace": cfg.n_dense_layers,
        "moe_layer_freq": 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
        "initializer_range": init_rules(cfg).matrix_std,
        "bos_token_id": bos_id,
        "eos_token_id": bos_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _interleave_rope(rows: torch.Tensor) -> torch.Tensor:
    """Rows [..., d, in] from half-split pair order (i, i + d/2) to interleaved order (2i, 2i + 1)."""
    half = rows.shape[-2] // 2
    order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=-1).reshape(-1)
    return rows[..., order, :]


def _query_rows(w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Per-head query weight [H*(nope+rope), in] with each head's rope rows interleaved."""
    heads = w.view(cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, -1)
    nope, rope = heads.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=1)
    return torch.cat((nope, _interleave_rope(rope)), dim=1).reshape(w.shape)


def hf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight, block by block (nmoe state-dict names in)."""
    yield "model.embed_tokens.weight", state["tok_emb.weight"]
    for i in range(cfg.n_layers):
        yield from _block_tensors(cfg, state, i)
    yield "model.norm.weight", state["norm.weight"]
    yield "lm_head.weight", state["head.weight"]


def _block_tensors(cfg: ModelConfig, state, i: int) -> Iterator[tuple[str, torch.Tensor]]:
    src, dst = f"blocks.{i}.", f"model.layers.{i}."
    yield dst + "input_layernorm.weight", state[src + "attn_norm.weight"]
    yield dst + "post_attention_layernorm.weight", state[src + "ffn_norm.weight"]
    att = dst + "self_attn."
    q_out = cfg.q_lora_rank or cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    q, c_kv, k_rope = state[src + "attn.wqkv_a.weight"].split([q_out, cfg.kv_lora_rank, cfg.qk_rope_head_dim])
    if cfg.q_lora_rank:
        yield att + "q_a_proj.weight", q
        yield att + "q_a_layernorm.weight", state[src + "attn.q_norm.weight"]
        yield att + "q_b_proj.weight", _query_rows(state[src + "attn.wq_b.weight"], cfg)
    else:
        yield att + "q_proj.weight", _query_rows(q, cfg)
    yield att + "kv_a_proj_with_mqa.weight", torch.cat((c_kv, _interleave_rope(k_rope)))
    yield att + "kv_a_layernorm.weight", state[src + "attn.kv_norm.weight"]
    yield att + "kv_b_proj.weight", state[src + "attn.wkv_b.weight"]
    yield att + "o_proj.weight", state[src + "attn.wo.weight"]
    mlp = dst + "mlp."
    if i < cfg.n_dense_layers:
        yield from _swiglu(mlp, state[src + "ffn.w13.weight"], state[src + "ffn.w2.weight"])
        return
    yield mlp + "gate.weight", state[src + "ffn.gate"]
    yield mlp + "gate.e_score_correction_bias", state[src + "ffn.expert_bias"].float()
    hidden = cfg.moe_inter_dim
    w_up, w_down = state[src + "ffn.w_up"], state[src + "ffn.w_down"]  # [E, D, 2H] (gate | up), [E, H, D]
    for e in range(cfg.n_routed_experts):
        yield mlp + f"experts.{e}.gate_proj.weight", w_up[e, :, :hidden].t()
        yield mlp + f"experts.{e}.up_proj.weight", w_up[e, :, hidden:].t()
        yield mlp + f"experts.{e}.down_proj.weight", w_down[e].t()
    if cfg.n_shared_experts:
        w13, w2 = state[src + "ffn.shared.w13.weight"], state[src + "ffn.shared.w2.weight"]
    else:  # DeepSeek-V3 always has the shared-expert MLP: a zero-width one adds nothing
        w13, w2 = w_up.new_zeros(0, cfg.dim), w_up.new_zeros(cfg.dim, 0)
    yield from _swiglu(mlp + "shared_experts.", w13, w2)


def _swiglu(prefix: str, w13: torch.Tensor, w2: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    gate, up = w13.chunk(2, dim=0)
    yield prefix + "gate_proj.weight", gate
    yield prefix + "up_proj.weight", up
    yield prefix + "down_proj.weight", w2


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors in the safetensors format (8-byte header length, JSON header, raw little-endian data)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    os.replace(tmp, path)


def export_model(
    cfg: ModelConfig, state: dict[str, torch.Tensor], out_dir: str | Path, *, bos_id: int | None, dtype=torch.bfloat16
) -> list[Path]:
    """Write config.json and model(-0000k-of-0000n).safetensors (+ index) into out_dir; return the files.

    Shards of at most MAX_SHARD_BYTES are written as they fill, so memory holds one shard beyond `state`.
    """
    check_exportable(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts: list[tuple[Path, list[str]]] = []  # written shards under temporary names, with their tensor names
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    for name, t in hf_tensors(cfg, state):
        t = t.detach().cpu().to(torch.float32 if name.endswith("e_score_correction_bias") else dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > MAX_SHARD_BYTES:
            parts.append(_write_part(out, len(parts), shard))
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
        total += nbytes
    parts.append(_write_part(out, len(parts), shard))
    if len(parts) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors" for k in range(len(parts))]
    files = []
    for name, (tmp, _) in zip(names, parts):
        os.replace(tmp, out / name)
        files.append(out / name)
    if len(parts) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t: n for n, (_, ts) in zip(names, parts) for t in ts},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        files.append(out / "model.safetensors.index.json")
    (out / "config.json").write_text(json.dumps(hf_config(cfg, bos_id, dtype), indent=1) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_id, "eos_token_id": bos_id, "do_sample": False}, indent=1) + "\n"
    )
    return [out / "config.json", out / "generation_config.json", *files]


def _write_part(out: Path, k: int, shard: dict[str, torch.Tensor]) -> tuple[Path, list[str]]:
    path = out / f".part-{k:05d}.safetensors"
    write_safetensors(path, shard)
    return path, list(shard)


def export_tokenizer(tokenizer, out_dir: str | Path) -> list[Path]:
    """tokenizer.json + tokenizer_config.json for a `tokenizers` (hf) tokenizer; [] for tiktoken ones."""
    if tokenizer.kind != "hf":
        return []
    out = Path(out_dir)
    (out / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.bos_token,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return [out / "tokenizer.json", out / "tokenizer_config.json"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nmoe-export",
        description="Export an nmoe checkpoint as a Hugging Face DeepSeek-V3 model (config.json + safetensors "
        "+ tokenizer.json), loadable by transformers' DeepseekV3ForCausalLM, lm-eval-harness and vLLM.",
        epilog="example: uv run nmoe-export runs/checkpoints/moonlet exported/moonlet --dtype bf16",
    )
    p.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint directory or a run's checkpoint folder (its latest)")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the run's data.tokenizer)")
    args = p.parse_args(argv)
    from nmoe.train.inference import LoadError, load_model

    try:
        cfg, model, tok = load_model(args.checkpoint, "cpu", args.tokenizer)
        check_exportable(cfg.model)
        files = export_model(
            cfg.model, model.state_dict(), args.out_dir, bos_id=tok.bos_id, dtype=EXPORT_DTYPES[args.dtype]
        )
        files += export_tokenizer(tok, args.out_dir)
    except (LoadError, ExportError) as e:
        print(f"nmoe-export: error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    if tok.kind != "hf":
        print(
            "nmoe-export: the tokenizer is a tiktoken rank file; no tokenizer.json was written. Tokenize with "
            "nmoe.data.Tokenizer, or convert it to a `tokenizers` tokenizer.json yourself.",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
