"""Throughput peer: nmoe against torchtitan 0.3.0's DeepSeek-V3 at the same shape, same GPU, same process.

One training step = forward + backward (bf16 autocast) + grad clip + fused AdamW (nmoe.train.optim's groups for
both) + the aux-loss-free bias update, on the same random tokens. Each model compiled its own best way: nmoe
`torch.compile` of the whole model (fullgraph; the expert path is torch.library custom ops), torchtitan each
block with fullgraph as its apply_compile does (flex attention inside). Reported: median step time of the
timed steps after warmup, tokens/s, MFU (nmoe's model_summary FLOPs/token, causal attention, / peak), peak memory
of the timed steps, and the warmup (compile) seconds.

GPU (torchtitan's wheels unpacked to /tmp/site, see bench/README-device.md):
  PYTHONPATH=$(ls -d packages/*/src | paste -sd:):/tmp/site python3 bench/peer.py --out $OUT/peer
CPU check of the script (tiny shape, eager):
  ... python3 bench/peer.py --smoke --out /tmp/peer
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nmoe.model import ModelConfig, Transformer, model_summary  # noqa: E402
from nmoe.train.config import OptimConfig, load_config  # noqa: E402
from nmoe.train.optim import build_optimizer, set_lr  # noqa: E402

DEFAULT_SHAPES = "configs/moonlet.toml@8x2048,configs/moonlet.toml@12x2048,configs/moonlight.toml:4@4x2048"
SMOKE_SHAPE = dict(
    vocab_size=512,
    dim=64,
    n_layers=3,
    n_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    inter_dim=128,
    n_routed_experts=8,
    n_shared_experts=1,
    moe_inter_dim=32,
    top_k=2,
    max_seq_len=128,
)


DYNAMO_DEFAULTS = {k: getattr(torch._dynamo.config, k) for k in ("capture_scalar_outputs",)}


@dataclasses.dataclass(frozen=True)
class Shape:
    label: str
    cfg: ModelConfig
    batch: int
    seq: int


def parse_shape(text: str, smoke: bool) -> Shape:
    """'CONFIG[:LAYERS]@BxS' -> Shape, e.g. configs/moonlight.toml:4@4x2048 (moonlight cut to 4 layers)."""
    try:
        where, bs = text.split("@")
        batch, seq = (int(v) for v in bs.lower().split("x"))
        path, _, layers = where.partition(":")
    except ValueError:
        raise SystemExit(
            f"--shapes item {text!r}: write CONFIG[:LAYERS]@BxS, e.g. configs/moonlet.toml@8x2048"
        ) from None
    cfg = load_config(path).model
    if smoke:
        cfg = dataclasses.replace(cfg, **SMOKE_SHAPE)
    if layers:
        cfg = dataclasses.replace(cfg, n_layers=int(layers), n_dense_layers=min(cfg.n_dense_layers, int(layers) - 1))
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq))
    name = Path(path).stem + (f"/{layers}L" if layers else "")
    return Shape(f"{name} {batch}x{seq}", cfg, batch, seq)


def build(kind: str, cfg: ModelConfig, device: torch.device, compile_: bool, fullgraph: bool):
    """(model, forward callable); nmoe whole-model compile, torchtitan per-block compile."""
    if kind == "torchtitan":
        from torchtitan_model import TorchtitanLM

        model = TorchtitanLM(cfg, device, seed=0)
        if compile_:
            model.compile_blocks()
        return model, model
    with torch.device(device):
        model = Transformer(cfg)
    model.init_weights(0)
    return model, (torch.compile(model, fullgraph=fullgraph) if compile_ else model)


def make_step(model, forward, optimizer, device: torch.device):
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(x)
        loss = F.cross_entropy(out.logits.float().view(-1, out.logits.shape[-1]), y.reshape(-1)) + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=device.type == "cuda")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_expert_bias()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(kind: str, shape: Shape, args, device: torch.device, fullgraph: bool) -> dict:
    """One model at one shape: warmup (compile) then timed steps."""
    cleanup(device)
    torch._dynamo.reset()
    for key, value in DYNAMO_DEFAULTS.items():  # undo torchtitan apply_compile's global settings
        setattr(torch._dynamo.config, key, value)
    cfg = shape.cfg
    model, forward = build(kind, cfg, device, args.compile, fullgraph)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4), fused=device.type == "cuda")
    set_lr(optimizer, 1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (shape.batch, shape.seq + 1), generator=gen).to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    step = make_step(model, forward, optimizer, device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(x, y)
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        step(x, y)
        sync(device)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    tokens_per_s = shape.batch * shape.seq / median
    flops = model_summary(cfg, shape.seq, shape.batch).flops_per_token
    row = {
        "shape": shape.label,
        "model": kind,
        "compile": ("whole model" + (", fullgraph" if fullgraph else ", graph breaks allowed"))
        if kind == "nmoe" and args.compile
        else ("per block, fullgraph" if args.compile else "eager"),
        "step_ms": median * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "tokens_per_s": tokens_per_s,
        "mfu": flops * tokens_per_s / (args.peak_tflops * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "warmup_s": warmup_s,
        "status": "ok",
    }
    del model, forward, optimizer, step
    return row


def run(kind: str, shape: Shape, args, device: torch.device) -> dict:
    """measure() with the nmoe fullgraph fallback (printed and recorded) and OOM caught."""
    fullgraph = kind == "nmoe" and args.compile and not args.no_fullgraph
    try:
        try:
            return measure(kind, shape, args, device, fullgraph)
        except Exception as err:
            if not fullgraph or isinstance(err, torch.OutOfMemoryError):
                raise
            print(f"[peer] nmoe fullgraph compile failed ({type(err).__name__}: {str(err).splitlines()[0][:200]});")
            print("[peer] retrying nmoe with graph breaks allowed (recorded in the row's `compile`)", flush=True)
            cleanup(device)
            return measure(kind, shape, args, device, False)
    except torch.OutOfMemoryError:
        return {"shape": shape.label, "model": kind, "status": "out of memory"}
    except Exception as err:
        traceback.print_exc()
        return {"shape": shape.label, "model": kind, "status": f"failed: {type(err).__name__}: {str(err)[:160]}"}
    finally:
        cleanup(device)


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | model | compile | tokens/s | MFU | step ms | peak GiB | warmup s | nmoe / torchtitan |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['shape']} | {r['model']} | {r['status']} | | | | | | |")
            continue
        other = next(
            (o for o in rows if o["shape"] == r["shape"] and o["model"] == "torchtitan" and o["status"] == "ok"), None
        )
        ratio = f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x" if other and r["model"] == "nmoe" else ""
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(
            f"| {r['shape']} | {r['model']} | {r['compile']} | {r['tokens_per_s']:,.0f} | {r['mfu'] * 100:.1f}% | "
            f"{r['step_ms']:.1f} | {mem} | {r['warmup_s']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of CONFIG[:LAYERS]@BxS")
    p.add_argument("--models", default="nmoe,torchtitan")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (compile happens in the first)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager for both")
    p.add_argument("--no-fullgraph", action="store_true", help="nmoe: allow graph breaks from the start")
    p.add_argument("--peak-tflops", type=float, default=989.4, help="MFU denominator (H100 SXM dense bf16)")
    p.add_argument("--max-minutes", type=float, default=4.5, help="skip runs that would end past this")
    p.add_argument("--out", default="bench/results/peer", help="directory for peer.json")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, eager, 2+2 steps")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.shapes, args.compile, args.warmup, args.iters = "configs/moonlet.toml@2x64", False, 2, 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64
    shapes = [parse_shape(s, args.smoke) for s in args.shapes.split(",") if s]
    kinds = [k for k in args.models.split(",") if k]
    if bad := [k for k in kinds if k not in ("nmoe", "torchtitan")]:
        raise SystemExit(f"--models {bad}: choose from nmoe, torchtitan")
    checks = {}
    if "torchtitan" in kinds:
        from torchtitan_model import TorchtitanLM, check_shape, import_torchtitan

        import_torchtitan()
        for shape in shapes:  # same parameters and FLOPs as nmoe's summary, on the meta device
            checks[shape.label] = check_shape(TorchtitanLM(shape.cfg, "meta"), shape.seq)
            print(f"[peer] {shape.label}: torchtitan model = nmoe shape {checks[shape.label]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "shape_checks": checks,
        "rows": [],
    }
    start, longest = time.perf_counter(), 0.0
    for shape in shapes:
        for kind in kinds:
            if time.perf_counter() - start + longest > args.max_minutes * 60:
                row = {"shape": shape.label, "model": kind, "status": f"skipped (--max-minutes {args.max_minutes})"}
            else:
                t = time.perf_counter()
                row = run(kind, shape, args, device)
                longest = max(longest, time.perf_counter() - t)
            print(f"[peer] {json.dumps({k: v for k, v in row.items() if k != 'step_ms_all'})}", flush=True)
            record["rows"].append(row)
            (out / "peer.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"\n[peer] total {time.perf_counter() - start:.0f} s; JSON {out / 'peer.json'}\n")
    print(table(record["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
