"""GPU smoke + throughput of one model step (fwd+bwd, bf16 autocast) per config: eager vs torch.compile,
plus the host-sync sites of a step. No optimizer, no data: the model alone.

Run on a CUDA machine: PYTHONPATH=$(ls -d packages/*/src | tr '\n' ':') python3 \
    bench/model_step.py configs/tiny.toml:8x512 configs/moonlet.toml:2x4096
"""

from __future__ import annotations

import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

from nmoe.model import Transformer, model_summary
from nmoe.train.config import load_config
from nmoe.train.mfu import peak_tflops


def step(model, idx):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(idx)
    loss = F.cross_entropy(out.logits.view(-1, out.logits.shape[-1]), idx.view(-1)) + out.aux_loss
    loss.backward()
    return loss.detach()


def timed(model, idx, iters=5):
    for _ in range(2):
        step(model, idx)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = step(model, idx)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters, loss.item()


def sync_sites(model, idx):
    """Source lines of host syncs during one eager step (torch's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(model, idx)
    torch.cuda.set_sync_debug_mode(0)
    sites = []
    for w in caught:
        if "synchroniz" in str(w.message):
            sites.append(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}")
    return sorted(set(sites))


def run(name, bsz, seq, compile_too=True):
    cfg = load_config(name).model
    summary = model_summary(cfg, seq, bsz)
    peak = (peak_tflops(torch.cuda.get_device_name()) or 989.4) * 1e12
    model = Transformer(cfg).cuda()
    model.init_weights(0)
    idx = torch.randint(0, cfg.vocab_size, (bsz, seq), device="cuda")
    print(
        f"== {name} B={bsz} S={seq} params={summary.total_params / 1e9:.3f}B active={summary.active_params / 1e9:.3f}B "
        f"attn={summary.attention_kinds}",
        flush=True,
    )
    print("   host-sync sites:", sync_sites(model, idx)[:8], flush=True)
    variants = [("eager", model)] + ([("compiled", torch.compile(model))] if compile_too else [])
    for label, m in variants:
        try:
            torch.cuda.reset_peak_memory_stats()
            sec, loss = timed(m, idx)
            tps = bsz * seq / sec
            print(
                f"   {label:9s} {sec * 1e3:8.1f} ms/step  {tps:10.0f} tok/s  MFU {summary.mfu(tps, peak):.3f}  "
                f"loss {loss:.4f}  peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
                f"(est act {summary.activation_bytes / 2**30:.1f} GiB)",
                flush=True,
            )
        except Exception:
            print(f"   {label} FAILED: " + traceback.format_exc().splitlines()[-1][:300], flush=True)
        model.zero_grad(set_to_none=True)
    stats = model.router_stats().as_scalars()
    print("   router:", {k: round(v, 3) for k, v in stats.items() if k.startswith("router/mean/")}, flush=True)
    del model
    torch.cuda.empty_cache()


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    for arg in sys.argv[1:] or ["configs/tiny.toml:8x512"]:
        name, shape, *mode = arg.split(":")
        b, s = shape.split("x")
        try:
            run(name, int(b), int(s), compile_too=mode != ["eager"])
        except Exception:
            traceback.print_exc()
