"""torchtitan 0.3.0's DeepSeek-V3 model at the shape of an nmoe ModelConfig, initialised torchtitan's way.

`TorchtitanLM(cfg, device, seed)` wraps torchtitan's `DeepSeekV3Model` behind the interface the nmoe bench loops
use (`forward(idx) -> ModelOutput`, `update_expert_bias()`, `param_kinds()`), so nmoe's own optimizer groups,
data and loss apply to it unchanged. Built as torchtitan's trainer builds it: config from
`torchtitan.models.deepseek_v3` (its own per-part inits), meta device, `to_empty`, `init_weights` under the seed.
`check_shape` proves the shape: parameter count equal to nmoe's `model_summary`, torchtitan's FLOPs/token
formula equal to nmoe's (matmuls + full-square attention, + the norm weights torchtitan counts as dense).

torchtitan must be importable: on the GPU machine unpack the wheels of bench/README-device.md to /tmp/site.

  PYTHONPATH=$(ls -d packages/*/src | paste -sd:):/tmp/site python3 bench/torchtitan_model.py configs/moonlet.toml
  ... bench/torchtitan_model.py --smoke   # CPU, tiny shape: init stds of torchtitan vs nmoe's
                                          # init_scheme="torchtitan", and equal logits from equal weights
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from nmoe.model import ModelConfig, ModelOutput, Transformer, model_summary

TORCHTITAN_VERSION = "0.3.0"
README = "bench/README-device.md"


def import_torchtitan() -> types.ModuleType:
    """torchtitan.models.deepseek_v3, after the one shim torch 2.11 needs; a clear error when it is missing."""
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "DataParallelMeshDims"):
        # torchtitan 0.3.0 names this newer torch class in type hints of its FSDP helpers only (not used here)
        fsdp.DataParallelMeshDims = type("DataParallelMeshDims", (), {})
    try:
        import torchtitan
        import torchtitan.models.deepseek_v3 as ds
    except ImportError as err:
        raise SystemExit(
            f"cannot import torchtitan ({err}). Install torchtitan=={TORCHTITAN_VERSION} and its model-time "
            f"dependencies from wheels as {README} says, and put them on PYTHONPATH (e.g. /tmp/site)."
        ) from None
    version = getattr(torchtitan, "__version__", None)
    if version is not None and not str(version).startswith(TORCHTITAN_VERSION):
        print(
            f"[torchtitan_model] note: torchtitan {version} found, these scripts were written for {TORCHTITAN_VERSION}"
        )
    return ds


def _check_supported(cfg: ModelConfig) -> None:
    problems = []
    if cfg.attn != "mla":
        problems.append(f"model.attn = {cfg.attn!r} (torchtitan's DeepSeek-V3 is MLA only)")
    if cfg.attn_local != "none":
        problems.append(f"model.attn_local = {cfg.attn_local!r} (no sliding-window layers there)")
    if cfg.capacity_factor or cfg.balance_loss_coef or cfg.z_loss_coef:
        problems.append("model.capacity_factor / balance_loss_coef / z_loss_coef must be 0 (dropless, no aux loss)")
    if not cfg.has_moe:
        problems.append("a dense model (n_dense_layers == n_layers)")
    if problems:
        raise SystemExit("torchtitan's DeepSeek-V3 cannot take this shape: " + "; ".join(problems))


def tt_config(cfg: ModelConfig, attn_backend: str = "flex"):
    """torchtitan DeepSeekV3Model.Config of nmoe shape `cfg`, with torchtitan's own DeepSeek-V3 inits."""
    _check_supported(cfg)
    ds = import_torchtitan()
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm

    yarn = cfg.rope_factor > 1.0
    rope = ComplexRoPE.Config(
        dim=cfg.qk_rope_head_dim,
        max_seq_len=cfg.max_seq_len,
        theta=cfg.rope_theta,
        scaling="yarn" if yarn else "none",
        rope_factor=cfg.rope_factor,
        beta_fast=cfg.beta_fast,
        beta_slow=cfg.beta_slow,
        original_seq_len=cfg.original_seq_len,
    )
    grouped = cfg.n_groups > 1
    layers = ds._build_dsv3_layers(  # DeepSeek-V3's registry builder: torchtitan's inits per layer
        n_layers=cfg.n_layers,
        n_dense_layers=cfg.n_dense_layers,
        dim=cfg.dim,
        n_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        mscale=cfg.mscale,
        dense_hidden_dim=max(cfg.inter_dim, 1),
        moe_hidden_dim=cfg.moe_inter_dim,
        num_experts=cfg.n_routed_experts,
        num_shared_experts=cfg.n_shared_experts,
        router_top_k=cfg.top_k,
        router_score_func=cfg.score_func,
        router_num_expert_groups=cfg.n_groups if grouped else None,
        router_num_limited_groups=cfg.topk_groups if grouped else None,
        router_route_scale=cfg.route_scale,
        router_route_norm=cfg.route_norm,
        attn_backend=attn_backend,
        moe_comm_backend="standard",
        non_blocking_capacity_factor=None,
        rope=rope,
    )
    for layer in layers:
        if layer.moe is not None:
            layer.moe.load_balance_coeff = cfg.bias_update_rate or None
            if not cfg.n_shared_experts:
                layer.moe.shared_experts = None
    return ds.DeepSeekV3Model.Config(
        vocab_size=cfg.vocab_size,
        dim=cfg.dim,
        tok_embeddings=Embedding.Config(
            num_embeddings=cfg.vocab_size, embedding_dim=cfg.dim, param_init=ds._EMBEDDING_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=cfg.dim, param_init=ds._NORM_INIT),
        lm_head=Linear.Config(
            in_features=cfg.dim, out_features=cfg.vocab_size, param_init=ds._output_linear_init(cfg.dim)
        ),
        layers=layers,
    )


class SdpaCausal(nn.Module):
    """Causal SDPA with the call signature of torchtitan's inner attention ([B,L,N,H] layout); the CPU stand-in
    for FlexAttention, which has no CPU backward."""

    def forward(self, q, k, v, *, attention_masks=None, scale=None, **_):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
        )
        return out.transpose(1, 2)


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


class TorchtitanLM(nn.Module):
    """torchtitan's DeepSeek-V3 at shape `cfg`, with the nmoe model's training interface.

    attention: "flex" (torchtitan's, GPU) or "sdpa" (causal SDPA stand-in; what CPU uses). The mask is plain
    causal over the whole row, as nmoe attends (no per-document masking). device "meta": shape only, no init.
    """

    def __init__(
        self, cfg: ModelConfig, device: torch.device | str = "cpu", seed: int = 0, attention: str | None = None
    ):
        super().__init__()
        device = torch.device(device)
        self.cfg = cfg
        self.attention = attention or ("flex" if device.type == "cuda" else "sdpa")
        self.tt_cfg = tt_config(cfg)
        with torch.device("meta"):
            self.model = self.tt_cfg.build()
        for module in self.model.modules():
            if isinstance(module, nn.RMSNorm):
                module.eps = cfg.norm_eps  # torchtitan's default is 1e-5
        if self.attention == "sdpa":
            for block in self.model.layers.values():
                block.attention.inner_attention = SdpaCausal()
        self._masks: dict = {}
        if device.type == "meta":  # shape only
            return
        self.model.to_empty(device=device)
        torch.manual_seed(seed)
        with torch.no_grad():
            self.model.init_weights(buffer_device=device)

    def forward(self, idx: torch.Tensor) -> ModelOutput:
        """idx[B,S] int64 -> ModelOutput(logits[B,S,V] float32, aux_loss 0)."""
        logits = self.model(idx, attention_masks=self._mask(idx.shape[1], idx.device))
        return ModelOutput(logits.float(), logits.new_zeros((), dtype=torch.float32))

    def _mask(self, seq: int, device: torch.device):
        if self.attention != "flex":
            return None
        from torch.nn.attention.flex_attention import create_block_mask

        key = (seq, str(device))
        if key not in self._masks:
            block = self.tt_cfg.layers[0].attention.inner_attention.block_size
            self._masks[key] = create_block_mask(_causal, None, None, seq, seq, device=device, BLOCK_SIZE=block)
        return self._masks[key]

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing as torchtitan's optimizer pre-hook does it: bias += coeff * sign(mean - load),
        the step centred, load reset."""
        for block in self.model.layers.values():
            moe = getattr(block, "moe", None) if block.moe_enabled else None
            if moe is None or moe.load_balance_coeff is None:
                continue
            load = moe.tokens_per_expert_E.float()
            step = moe.load_balance_coeff * torch.sign(load.mean() - load)
            moe.expert_bias_E.add_(step - step.mean())
            moe.tokens_per_expert_E.zero_()

    def param_kinds(self) -> dict[str, str]:
        """{name: nmoe parameter kind}, so nmoe.train.optim groups these parameters as it groups nmoe's."""
        kinds = {}
        for name, p in self.named_parameters():
            if name.endswith("tok_embeddings.weight"):
                kinds[name] = "embedding"
            elif name.endswith("lm_head.weight"):
                kinds[name] = "head"
            elif name.endswith("norm.weight"):
                kinds[name] = "norm"
            elif ".router.gate." in name:
                kinds[name] = "router"
            elif ".inner_experts." in name:
                kinds[name] = "expert"
            else:
                kinds[name] = "matrix" if p.dim() >= 2 else "bias"
        return kinds

    def compile_blocks(self) -> None:
        """torch.compile each transformer block (fullgraph), as torchtitan's apply_compile does."""
        from torchtitan.distributed.compile import apply_compile

        compile_cfg = types.SimpleNamespace(backend="inductor", enable_async_tensor_parallel=False)
        apply_compile(self.model, compile_config=compile_cfg, parallel_dims=types.SimpleNamespace(tp_enabled=False))


def use_plain_flex_compile() -> None:
    """Compile torchtitan's flex attention without its max-autotune options (same kernels' numerics, far shorter
    first call); for runs whose time goes to learning, not to a throughput comparison."""
    from torch.nn.attention.flex_attention import flex_attention
    from torchtitan.models.common.attention import FlexAttention

    FlexAttention._compiled_flex_attn = torch.compile(flex_attention)


# ------------------------------------------------------------------------------------------------ checks
def check_shape(lm: TorchtitanLM, seq_len: int) -> dict:
    """Parameter count and FLOPs/token of the torchtitan model against nmoe's model_summary; raises on mismatch."""
    cfg = lm.cfg
    summary = model_summary(cfg, seq_len)
    params = sum(p.numel() for p in lm.model.parameters())
    tt_params, tt_flops = lm.tt_cfg.get_nparams_and_flops(lm.model, seq_len)
    norms = sum(p.numel() for n, p in lm.model.named_parameters() if n.endswith("norm.weight"))
    # torchtitan: 6 x (active params - embedding, norms included) + 6 x layers x heads x (qk + v) x seq (full square)
    nmoe_flops = summary.matmul_flops_per_token + summary.attention_flops_per_token_dense + 6 * norms
    row = {
        "params_torchtitan": params,
        "params_nmoe": summary.total_params,
        "flops_per_token_torchtitan_formula": tt_flops,
        "flops_per_token_nmoe_same_convention": nmoe_flops,
        "flops_per_token_nmoe_causal": summary.flops_per_token,
    }
    if params != summary.total_params or tt_params != params:
        raise SystemExit(f"parameter counts differ: {row}")
    if abs(tt_flops - nmoe_flops) > 6:  # torchtitan rounds routed-expert params down, nmoe to nearest
        raise SystemExit(f"FLOPs per token differ: {row}")
    return row


def _rope_perm(dim: int) -> torch.Tensor:
    """Row order taking half-split RoPE pairs (i, i + d/2) (nmoe) to adjacent pairs (2i, 2i + 1) (torchtitan)."""
    return torch.stack([torch.arange(dim // 2), torch.arange(dim // 2) + dim // 2], dim=1).reshape(-1)


def tt_state_from_nmoe(nmoe: Transformer) -> dict[str, torch.Tensor]:
    """torchtitan state dict holding nmoe's weights (same function: fused matrices split, RoPE rows permuted)."""
    cfg = nmoe.cfg
    heads, nope, rope = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    perm = _rope_perm(rope)
    out = {
        "tok_embeddings.weight": nmoe.tok_emb.weight,
        "lm_head.weight": nmoe.head.weight,
        "norm.weight": nmoe.norm.weight,
    }
    for block in nmoe.blocks:
        t, a = f"layers.{block.layer}.", block.attn
        out[t + "attention_norm.weight"] = block.attn_norm.weight
        out[t + "ffn_norm.weight"] = block.ffn_norm.weight
        q, kv, k_rope = a.wqkv_a.weight.split(a.split, dim=0)
        q_name = "wq_a" if cfg.q_lora_rank else "wq"
        if cfg.q_lora_rank:
            out[t + "attention.wq_a.weight"] = q
            out[t + "attention.q_norm.weight"] = a.q_norm.weight
            q = a.wq_b.weight
            q_name = "wq_b"
        q = q.view(heads, nope + rope, -1)
        q = torch.cat([q[:, :nope], q[:, nope:][:, perm]], dim=1).reshape(heads * (nope + rope), -1)
        out[t + f"attention.{q_name}.weight"] = q
        out[t + "attention.wkv_a.weight"] = torch.cat([kv, k_rope[perm]])
        out[t + "attention.kv_norm.weight"] = a.kv_norm.weight
        out[t + "attention.wkv_b.weight"] = a.wkv_b.weight
        out[t + "attention.wo.weight"] = a.wo.weight
        ffn = block.ffn
        if block.layer < cfg.n_dense_layers:
            _swiglu(out, t + "feed_forward.", ffn)
            continue
        out[t + "moe.router.gate.weight"] = ffn.gate
        gate, up = ffn.w_up.chunk(2, dim=-1)  # [E, D, F] each
        out[t + "moe.routed_experts.inner_experts.w1_EFD"] = gate.transpose(1, 2)
        out[t + "moe.routed_experts.inner_experts.w3_EFD"] = up.transpose(1, 2)
        out[t + "moe.routed_experts.inner_experts.w2_EDF"] = ffn.w_down.transpose(1, 2)
        out[t + "moe.expert_bias_E"] = ffn.expert_bias
        if ffn.shared is not None:
            _swiglu(out, t + "moe.shared_experts.", ffn.shared)
    return {k: v.detach().contiguous() for k, v in out.items()}


def _swiglu(out: dict, prefix: str, ffn) -> None:
    w1, w3 = ffn.w13.weight.chunk(2, dim=0)
    out[prefix + "w1.weight"], out[prefix + "w3.weight"], out[prefix + "w2.weight"] = w1, w3, ffn.w2.weight


def init_std_table(lm: TorchtitanLM, nmoe: Transformer) -> list[tuple[str, float, float]]:
    """(torchtitan name, empirical std there, empirical std of the same part in nmoe), every parameter."""
    mapped = tt_state_from_nmoe(nmoe)
    return [
        (name, p.detach().float().std().item(), mapped[name].float().std().item())
        for name, p in lm.model.named_parameters()
    ]


# ------------------------------------------------------------------------------------------------ CLI
SMOKE_SHAPE = dict(
    vocab_size=512,
    dim=128,
    n_layers=4,
    n_heads=4,
    attn="mla",
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_seq_len=64,
    inter_dim=256,
    n_dense_layers=1,
    n_routed_experts=16,
    n_shared_experts=1,
    moe_inter_dim=64,
    top_k=4,
    score_func="sigmoid",
    route_scale=2.5,
)


def smoke() -> int:
    """CPU: torchtitan's init stds equal nmoe's init_scheme='torchtitan' per tensor; same weights, same logits."""
    cfg = ModelConfig(**SMOKE_SHAPE, init_scheme="torchtitan")
    lm = TorchtitanLM(cfg, "cpu", seed=0)
    print(check_shape(lm, 64))
    nmoe = Transformer(cfg)
    nmoe.init_weights(0)
    worst = 0.0
    for name, tt_std, nmoe_std in init_std_table(lm, nmoe):
        n = dict(lm.model.named_parameters())[name].numel()
        rel = abs(tt_std - nmoe_std) / max(tt_std, 1e-12)
        worst = max(worst, rel / (6 / math.sqrt(2 * n)) if tt_std > 0 else 0)
        print(f"  {name:52s} torchtitan {tt_std:.5f}  nmoe[torchtitan] {nmoe_std:.5f}")
    print(f"init stds: worst |difference| = {worst:.2f} x the 6-standard-error tolerance")
    # same function: nmoe's weights (std 0.1 matrices so routing is far from uniform) in both models
    spread = Transformer(dataclasses.replace(cfg, init_scheme="nmoe", init_std=0.1))
    spread.init_weights(1)
    lm.model.load_state_dict(tt_state_from_nmoe(spread), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = spread(idx).logits, lm(idx).logits
    err = ((a - b).abs().max() / a.abs().max()).item()
    print(f"same weights: max |logit difference| / max |logit| = {err:.2e} (torchtitan runs experts in bf16)")
    loss = F.cross_entropy(lm(idx).logits.view(-1, cfg.vocab_size), idx.view(-1))
    loss.backward()
    ok = worst <= 1.0 and err < 3e-2 and all(p.grad is not None for p in lm.parameters())
    print("smoke OK" if ok else "smoke FAILED")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/moonlet.toml", help="nmoe training TOML ([model] used)")
    p.add_argument("--layers", type=int, help="override model.n_layers")
    p.add_argument("--seq", type=int, default=2048, help="sequence length for the FLOPs check")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape: init and same-function checks")
    args = p.parse_args()
    if args.smoke:
        return smoke()
    from nmoe.train.config import load_config

    cfg = load_config(args.config).model
    if args.layers:
        cfg = dataclasses.replace(cfg, n_layers=args.layers)
    row = check_shape(TorchtitanLM(cfg, "meta"), args.seq)
    print("| check | torchtitan | nmoe |\n|---|---|---|")
    print(f"| parameters | {row['params_torchtitan']:,} | {row['params_nmoe']:,} |")
    print(
        f"| FLOPs/token (torchtitan's formula) | {row['flops_per_token_torchtitan_formula'] / 1e9:.4f} G | "
        f"{row['flops_per_token_nmoe_same_convention'] / 1e9:.4f} G (causal: {row['flops_per_token_nmoe_causal'] / 1e9:.4f} G) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
