"""Learning per step, side by side on identical batches: nmoe under init ablations (one knob at a time from the
nmoe baseline, and all of torchtitan's together), nmoe with Muon (when nmoe.train.optim offers it), and
torchtitan 0.3.0's DeepSeek-V3 at the same shape with the same AdamW. Validation loss at fixed steps.

Every variant: the same prepared data through nmoe's loader (same seed, so the same batches in the same order),
the same fixed validation batches, bf16 autocast, AdamW from nmoe.train.optim (the config's [optim] with
--lr, warmup --warmup steps then constant), grad clip 1.0, aux-loss-free bias update every step.

GPU (one H100; torchtitan's wheels unpacked to /tmp/site, see bench/README-device.md):
  PYTHONPATH=$(ls -d packages/*/src | paste -sd:):/tmp/site python3 bench/learning.py --data .gpu/data/corpus-32k \\
      --out $OUT/learning
CPU check of the script (tiny shape, a few steps):
  ... python3 bench/learning.py --smoke --data DIR --out /tmp/learning
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import sys
import time
import traceback
import typing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nmoe.data import open_loader  # noqa: E402
from nmoe.model import ModelConfig, Transformer, model_summary  # noqa: E402
from nmoe.train.config import OptimConfig, load_config  # noqa: E402
from nmoe.train.optim import build_optimizer, set_lr  # noqa: E402
from nmoe.train.schedule import lr_at  # noqa: E402

PEAK_TFLOPS = 989.4  # H100 SXM dense bf16
DYNAMO_DEFAULTS = {k: getattr(torch._dynamo.config, k) for k in ("capture_scalar_outputs",)}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    what: str
    model: dict = dataclasses.field(default_factory=dict)  # ModelConfig overrides
    optimizer: str | None = None  # None: AdamW (nmoe.train.optim's default)
    torchtitan: bool = False


VARIANTS = [
    Variant("nmoe", "baseline: init_scheme nmoe", {"init_scheme": "nmoe"}),
    Variant("torchtitan", "torchtitan 0.3.0 DeepSeek-V3, its own init", torchtitan=True),
    Variant("nmoe-tt-init", "nmoe, init_scheme torchtitan (all knobs below)", {"init_scheme": "torchtitan"}),
    Variant("wide", "nmoe, init_scheme wide (torchtitan's + std 0.03, fan-in experts)", {"init_scheme": "wide"}),
    Variant("embed", "baseline + embedding std 1.0", {"init_scheme": "nmoe", "init_embed_std": 1.0}),
    Variant("head", "baseline + head std dim^-0.5 (trunc 3 std)", {"init_scheme": "nmoe", "init_head": "inv_sqrt_dim"}),
    Variant(
        "out_proj", "baseline + per-layer depth scaling (wo, w2, up)", {"init_scheme": "nmoe", "init_out_proj": "depth"}
    ),
    Variant("router", "baseline + router std / sqrt(2 (layer+1))", {"init_scheme": "nmoe", "init_router": "depth"}),
    Variant("experts", "baseline + fan-in expert std", {"init_scheme": "nmoe", "init_experts": "fan_in"}),
    Variant("muon", "baseline init, optim.optimizer muon", {"init_scheme": "nmoe"}, optimizer="muon"),
]

SMOKE_SHAPE = dict(
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


# ------------------------------------------------------------------------------------------------ setup
def muon_unavailable() -> str | None:
    """Why optim.optimizer = 'muon' cannot be used here, or None when nmoe.train.optim offers it."""
    field = {f.name: f for f in dataclasses.fields(OptimConfig)}.get("optimizer")
    if field is None:
        return "nmoe.train.config.OptimConfig has no `optimizer` key in this checkout"
    if "muon" not in field.metadata.get("choices", ("muon",)):
        return f"optim.optimizer allows only {field.metadata['choices']}"
    return None


def parse_custom(text: str) -> Variant:
    """'LABEL:key=value,key=value' with ModelConfig keys, `optimizer` or `torchtitan=1` -> a Variant."""
    if ":" not in text:
        raise SystemExit(f"--custom {text!r}: write LABEL:key=value[,key=value...], e.g. emb-head:init_embed_std=1.0")
    label, body = text.split(":", 1)
    hints = typing.get_type_hints(ModelConfig)
    model, optimizer, tt = {}, None, False
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        if key == "optimizer":
            optimizer = raw
        elif key == "torchtitan":
            tt = raw.lower() in ("1", "true", "yes")
        elif key in hints:
            model[key] = _parse_value(raw, hints[key], key)
        else:
            raise SystemExit(f"--custom {text!r}: unknown key {key!r} (model.* keys, optimizer, torchtitan)")
    return Variant(label, f"custom: {body}", model, optimizer, tt)


def _parse_value(raw: str, hint, key: str):
    allowed = typing.get_args(hint) or (hint,)
    if type(None) in allowed and raw.lower() in ("none", "null", ""):
        return None
    for kind in (bool, int, float, str):
        if kind not in allowed:
            continue
        if kind is bool:
            return raw.lower() in ("1", "true", "yes", "on")
        try:
            return kind(raw)
        except ValueError:
            continue
    raise SystemExit(f"--custom: {key}={raw!r} is not a {hint}")


def model_config(args, data_vocab: int) -> ModelConfig:
    """The [model] of --config with --layers and, under --smoke, the tiny shape."""
    cfg = load_config(args.config).model
    if args.smoke:
        cfg = dataclasses.replace(cfg, **SMOKE_SHAPE, vocab_size=max(data_vocab, 64))
    if args.layers:
        cfg = dataclasses.replace(cfg, n_layers=args.layers, n_dense_layers=min(cfg.n_dense_layers, args.layers - 1))
    if data_vocab > cfg.vocab_size:
        raise SystemExit(f"the data's tokenizer has {data_vocab} tokens but model.vocab_size = {cfg.vocab_size}")
    return dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.seq))


def optim_config(args) -> OptimConfig:
    cfg = load_config(args.config).optim
    return dataclasses.replace(cfg, lr=args.lr, warmup=args.warmup, warmdown=0, schedule="wsd")


# ------------------------------------------------------------------------------------------------ one variant
class Batches:
    """Host batches from nmoe's loader moved to the device (pinned, non-blocking on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in batch)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


def open_train_loader(args, cfg: ModelConfig, verify: bool):
    return open_loader(
        args.data,
        split="train",
        seq_len=args.seq,
        batch_size=args.batch,
        seed=args.seed,
        vocab_limit=cfg.vocab_size,
        verify=verify,
    )


def build(variant: Variant, cfg: ModelConfig, device: torch.device, seed: int, compile_: bool):
    """(model, forward callable) of one variant, initialised on `device`."""
    restore_dynamo_defaults()
    if variant.torchtitan:
        from torchtitan_model import TorchtitanLM

        model = TorchtitanLM(cfg, device, seed)
        if compile_:
            model.compile_blocks()
        return model, model
    with torch.device(device):
        model = Transformer(dataclasses.replace(cfg, **variant.model))
    model.init_weights(seed)
    return model, (torch.compile(model) if compile_ else model)


def restore_dynamo_defaults() -> None:
    """Undo the global dynamo settings torchtitan's apply_compile made for an earlier variant."""
    for key, value in DYNAMO_DEFAULTS.items():
        setattr(torch._dynamo.config, key, value)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def loss_of(forward, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast(device):
        out = forward(x)
    ce = F.cross_entropy(out.logits.float().view(-1, out.logits.shape[-1]), y.reshape(-1))
    return ce, out.aux_loss


@torch.no_grad()
def evaluate(model, forward, val, device) -> float:
    model.eval()
    try:
        return torch.stack([loss_of(forward, x, y, device)[0] for x, y in val]).mean().item()
    finally:
        model.train()


def run_variant(variant: Variant, cfg: ModelConfig, optim_cfg: OptimConfig, args, val, device) -> dict:
    """Train one variant for args.steps on the loader's batches; val loss at args.eval_at."""
    t0 = time.perf_counter()
    model, forward = build(variant, cfg, device, args.seed, args.compile)
    ocfg = dataclasses.replace(optim_cfg, optimizer=variant.optimizer) if variant.optimizer else optim_cfg
    optimizer = build_optimizer(model, ocfg, fused=device.type == "cuda")
    loader = open_train_loader(args, cfg, verify=False)  # verified once at start-up
    to_device = Batches(device)
    params = [p for p in model.parameters() if p.requires_grad]
    result = {"variant": variant.name, "what": variant.what, "val": {}, "train": {}, "status": "completed"}
    window = torch.zeros((), device=device)
    t_train, step = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        set_lr(optimizer, lr_at(step - 1, args.steps, ocfg))
        x, y = to_device(loader.next_batch())
        ce, aux = loss_of(forward, x, y, device)
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip, foreach=device.type == "cuda")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_expert_bias()
        window += ce.detach()
        if step % args.log_every == 0 or step == args.steps:
            mean = window.item() / (args.log_every if step % args.log_every == 0 else step % args.log_every)
            window.zero_()
            result["train"][step] = mean
            if not math.isfinite(mean):
                result["status"] = f"diverged by step {step}"
                break
        if step in args.eval_at:
            result["val"][step] = evaluate(model, forward, val, device)
            print(f"  [{variant.name}] step {step}: val {result['val'][step]:.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    now = time.perf_counter()
    result.update(
        seconds=now - t0,
        train_seconds=now - t_train,
        tokens_per_s=step * args.batch * args.seq / (now - t_train),
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    )
    del model, forward, optimizer
    return result


# ------------------------------------------------------------------------------------------------ report
def table(results: list[dict], eval_at: list[int]) -> str:
    base = next((r for r in results if r["variant"] == "nmoe" and r.get("val")), None)
    last = eval_at[-1]
    head = "| variant | what | " + " | ".join(f"val@{s}" for s in eval_at) + f" | Δ@{last} vs nmoe | s | tok/s |"
    lines = [head, "|" + "---|" * (len(eval_at) + 5)]
    for r in results:
        vals = [f"{r['val'][s]:.4f}" if s in r.get("val", {}) else "-" for s in eval_at]
        delta = "-"
        if base is not None and last in r.get("val", {}) and last in base["val"]:
            delta = f"{r['val'][last] - base['val'][last]:+.4f}"
        note = "" if r["status"] == "completed" else f" ({r['status']})"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        lines.append(f"| {r['variant']}{note} | {r['what']} | " + " | ".join(vals) + f" | {delta} | {secs} | {tps} |")
    return "\n".join(lines)


def estimate_seconds(cfg: ModelConfig, args) -> float:
    """Rough seconds per variant: FLOPs at an assumed 20% MFU (eager) or 25% (compiled) on an H100, plus set-up."""
    flops = model_summary(cfg, args.seq, args.batch).flops_per_token * args.batch * args.seq * args.steps
    return flops / ((0.25 if args.compile else 0.20) * PEAK_TFLOPS * 1e12) + (40 if args.compile else 10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset dir (its manifest.json) or mixture")
    p.add_argument("--config", default="configs/moonlet.toml", help="shape ([model]) and [optim] come from here")
    p.add_argument("--layers", type=int, help="model.n_layers (default 6: fits the device budget; 0 = config's)")
    p.add_argument("--batch", type=int, help="sequences per step (default 12; smoke 2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 2048; smoke 64)")
    p.add_argument("--steps", type=int, help="steps per variant (default 300; smoke 12)")
    p.add_argument("--eval-at", help="comma list of steps with a val loss (default: every 100, and the last)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps, then constant lr")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--variants",
        default=",".join(v.name for v in VARIANTS if v.name != "experts"),  # torchtitan's experts rule is nmoe's
        help=f"comma list, in run order, from {', '.join(v.name for v in VARIANTS)}",
    )
    p.add_argument("--custom", action="append", default=[], help="extra variant LABEL:key=value[,key=value]")
    p.add_argument("--compile", action="store_true", help="torch.compile (nmoe whole model, torchtitan per block)")
    p.add_argument("--tt-flex-autotune", action="store_true", help="keep torchtitan's max-autotune flex compile")
    p.add_argument("--max-minutes", type=float, default=8.0, help="skip variants that would end past this")
    p.add_argument("--out", default="bench/results/learning", help="directory for learning.json")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, a few steps")
    args = p.parse_args()
    smoke = args.smoke
    args.layers = (0 if smoke else 6) if args.layers is None else args.layers
    args.batch = args.batch or (2 if smoke else 12)
    args.seq = args.seq or (64 if smoke else 2048)
    args.steps = args.steps or (12 if smoke else 300)
    args.eval_batches = 2 if smoke else args.eval_batches
    if args.eval_at:
        args.eval_at = sorted({int(s) for s in args.eval_at.split(",")})
    else:
        every = 4 if smoke else 100
        args.eval_at = sorted(set(range(every, args.steps + 1, every)) | {args.steps})

    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64
    val_loader = open_loader(args.data, split="val", seq_len=args.seq, batch_size=args.batch, seed=args.seed)
    cfg = model_config(args, val_loader.vocab_size)
    val = [Batches(device)(b) for b in val_loader.val_batches(args.eval_batches)]
    optim_cfg = optim_config(args)
    available = int(open_train_loader(args, cfg, verify=True).samples.sum())
    epochs = args.steps * args.batch / max(available, 1)
    known = {v.name: v for v in VARIANTS}
    unknown = [n for n in args.variants.split(",") if n and n not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(known)} or add --custom")
    variants = [known[n] for n in args.variants.split(",") if n] + [parse_custom(c) for c in args.custom]
    if any(v.torchtitan for v in variants) and not args.tt_flex_autotune and device.type == "cuda":
        from torchtitan_model import import_torchtitan, use_plain_flex_compile

        import_torchtitan()
        use_plain_flex_compile()

    summary = model_summary(cfg, args.seq, args.batch)
    print(
        f"[learning] {cfg.n_layers} layers, {summary.total_params / 1e6:.0f}M params ({summary.active_params / 1e6:.0f}M "
        f"active), {summary.flops_per_token / 1e9:.3f} GFLOP/token, {args.batch} x {args.seq} tokens/step, "
        f"{args.steps} steps, val at {args.eval_at} on {len(val)} batches, device {device}",
        flush=True,
    )
    print(f"[learning] the train split holds {available:,} sequences of {args.seq}: {epochs:.2f} epochs", flush=True)
    if epochs > 1:
        print("[learning] note: the run repeats training data; later val losses partly measure memorisation")
    if device.type == "cuda":
        per = estimate_seconds(cfg, args)
        print(
            f"[learning] estimate ~{per:.0f} s per variant at an assumed MFU, ~{per * len(variants) / 60:.1f} min for "
            f"{len(variants)} variants; variants that would end past --max-minutes {args.max_minutes} are skipped",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": dataclasses.asdict(cfg),
        "optim": dataclasses.asdict(optim_cfg),
        "data": {"path": args.data, "train_sequences": available, "epochs": epochs},
        "args": {k: v for k, v in vars(args).items()},
        "results": [],
    }
    start = time.perf_counter()
    longest = estimate_seconds(cfg, args) if device.type == "cuda" else 0.0  # until a variant is measured
    measured: list[float] = []
    for variant in variants:
        result = {"variant": variant.name, "what": variant.what, "status": "skipped"}
        elapsed = time.perf_counter() - start
        why = muon_unavailable() if variant.optimizer == "muon" else None
        if why:
            result["status"] = f"skipped: {why}"
        elif elapsed + longest > args.max_minutes * 60:
            result["status"] = f"skipped: would end past --max-minutes {args.max_minutes}"
        else:
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                result = run_variant(variant, cfg, optim_cfg, args, val, device)
                measured.append(result["seconds"])
                longest = max(measured)
            except Exception as err:  # one variant failing must not lose the others
                traceback.print_exc()
                result["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        print(
            f"[learning] {variant.name}: {result['status']}"
            + (f" in {result['seconds']:.1f} s ({result['tokens_per_s']:,.0f} tok/s)" if "seconds" in result else ""),
            flush=True,
        )
        record["results"].append(result)
        (out / "learning.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"\n[learning] total {time.perf_counter() - start:.0f} s; JSON {out / 'learning.json'}\n")
    print(table(record["results"], args.eval_at))
    return 0


if __name__ == "__main__":
    sys.exit(main())
