"""How far a random-init model's logits move when each MoE output is rounded to fewer mantissa bits (CPU, fp32).

    uv run python bench/sensitivity.py configs/moonlet.toml --scale 4 --drop-bits 13

Explains comparisons of two correct computations that disagree on the GPU: `--drop-bits 13` keeps TF32's 10
mantissa bits (the Triton expert GEMMs on fp32 inputs run in TF32), 16 keeps bfloat16's 7. `--scale` multiplies
every matrix after init, as gpu_check_model_use.py once did. Also prints KV-cached decoding vs the full forward in
exact fp32, the comparison that check makes. Prints (relative logits error, argmax agreement) for each.
"""

from __future__ import annotations

import argparse
import tomllib

import torch

from nmoe.model import ModelConfig, Transformer
from nmoe.model.moe import MoE


def round_mantissa(t: torch.Tensor, drop: int) -> torch.Tensor:
    """t (fp32) rounded to nearest, keeping 23 - drop explicit mantissa bits."""
    bits = t.float().view(torch.int32)
    return ((bits + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


def compare(a: torch.Tensor, b: torch.Tensor) -> str:
    rel = ((a - b).norm() / b.norm()).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return f"{rel:.2e} / {agree:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="a TOML with a [model] section")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--drop-bits", type=int, default=13)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    with open(args.config, "rb") as f:
        cfg = ModelConfig(**tomllib.load(f)["model"])
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(args.scale)
    model.eval()
    n, half = args.tokens, args.tokens // 2
    seq = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq).logits
        cache = model.new_cache(1, n)
        steps = [model.decode(seq[:, :half], cache)] + [model.decode(seq[:, t : t + 1], cache) for t in range(half, n)]
        cached = torch.cat(steps, dim=1)
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.register_forward_hook(lambda mod, inp, out: (round_mantissa(out[0], args.drop_bits), out[1]))
        rounded = model(seq).logits
    print(
        f"{args.config} x{args.scale}: cached decode vs forward {compare(cached, full)}; "
        f"MoE outputs rounded ({23 - args.drop_bits} mantissa bits) vs exact {compare(rounded, full)}"
    )


if __name__ == "__main__":
    main()
