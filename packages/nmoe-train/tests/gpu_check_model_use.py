"""GPU check of the model-use tools at a real shape (run by hand on a CUDA machine; not collected by pytest).

    uv run python packages/nmoe-train/tests/gpu_check_model_use.py --bundle ../shared/eval/core [--config configs/moonlet.toml]

A random-init model of the config's [model] shape at its own init scale, on one GPU. (An earlier version scaled
every matrix by 4 so the logits would separate: that model is chaotic. On the CPU, rounding each MoE output to
TF32 precision alone moved its logits by 3e-2 relative and flipped 3% of the argmaxes, against 2e-4 and none at
the init scale; the GPU's fp32 expert GEMMs run in TF32, so its comparisons failed without any decoding error.)
1. KV-cached decode vs the full forward, against a noise floor measured the same way: the full forward of a
   shorter prefix vs the same positions of the full forward (the same math through other kernel shapes). An MoE
   amplifies kernel-level rounding wherever a token's top-k choice sits on a near-tie, so a fixed threshold
   alone cannot tell decoding errors from that; decoding may differ from the forward by at most 3x the floor
   (or the fixed threshold, whichever is larger).
2. Decode speed: tokens/s of cached generation vs recomputing the whole sequence per token.
3. CORE on the bundle: sequences/s, identical scores on a second run, accuracy differences between batch sizes.
4. If transformers is installed: HF DeepSeek-V3 export (bf16) loaded on the GPU, logits vs nmoe.
A table is printed last; exit code 1 if a hard check failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

from nmoe.model import ModelConfig, Transformer
from nmoe.train.core_eval import CORE_TASKS, evaluate_core, find_task_file
from nmoe.train.sample import generate

ROWS: list[tuple[str, str, str]] = []  # (check, result, verdict)


def row(check: str, result: str, ok: bool | None) -> None:
    verdict = "info" if ok is None else ("PASS" if ok else "FAIL")
    ROWS.append((check, result, verdict))
    print(f"{verdict:4}  {check}: {result}", flush=True)


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Transformer(cfg)
    model.init_weights(seed)
    return model.eval()


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(relative error of logits a vs b, share of positions with the same argmax)."""
    return ((a - b).norm() / b.norm()).item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def check_decode(cfg: ModelConfig, label: str) -> None:
    """Teacher-forced: prefill 64 tokens, then decode 64 more one by one; compare every position with forward."""
    model = build(cfg)
    seq = torch.randint(0, cfg.vocab_size, (1, 128), device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            full = model(seq).logits
            prefix = model(seq[:, :96]).logits
            cache = model.new_cache(1, 128)
            steps = [model.decode(seq[:, :64], cache)] + [
                model.decode(seq[:, t : t + 1], cache) for t in range(64, 128)
            ]
        cached = torch.cat(steps, dim=1)
        rel, agree = compare(cached, full)
        floor_rel, floor_agree = compare(prefix, full[:, :96])
        ok = rel <= max(5e-3 if dtype == torch.float32 else 3e-2, 3 * floor_rel) and agree >= min(
            0.95, floor_agree - 0.05
        )
        name = str(dtype).removeprefix("torch.")
        row(
            f"decode {label} {name}: cached vs forward logits rel. error / argmax agreement (floor)",
            f"{rel:.2e} / {agree:.3f} ({floor_rel:.2e} / {floor_agree:.3f})",
            ok,
        )


def bench_decode(cfg: ModelConfig, new_tokens: int) -> None:
    model = build(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (128,)).tolist()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate(model, prompt, 8)  # warm-up
        t0 = sync_time()
        generate(model, prompt, new_tokens)
        cached = new_tokens / (sync_time() - t0)
        seq = list(prompt)
        t0 = sync_time()
        with torch.no_grad():
            for _ in range(new_tokens // 4):
                seq.append(int(model(torch.tensor([seq], device="cuda")).logits[0, -1].argmax()))
        uncached = (new_tokens // 4) / (sync_time() - t0)
    row(
        "decode speed (bf16, batch 1, prompt 128)",
        f"cached {cached:.1f} tok/s, full recompute {uncached:.1f} tok/s",
        None,
    )


def bundle_tokenizer(bundle: Path, vocab: int):
    from nmoe.data import Tokenizer

    texts = []
    for task in CORE_TASKS:
        path = find_task_file(bundle, task)
        if path is not None:
            texts += path.read_text(encoding="utf-8").splitlines()[:300]
    return Tokenizer.train(texts, vocab)


def check_core(cfg: ModelConfig, bundle: Path, max_per_task: int) -> None:
    tok = bundle_tokenizer(bundle, min(cfg.vocab_size, 8192))
    model = build(cfg)
    kw = dict(device="cuda", max_per_task=max_per_task, progress=False)
    t0 = sync_time()
    first = evaluate_core(model, tok, bundle, batch_size=32, **kw)
    seconds = sync_time() - t0
    sequences = sum(s.n for s in first.tasks.values())
    row(
        "CORE run (random model)",
        f"{first.coverage}; {sequences} items in {seconds:.1f}s; score {first.score:.4f}",
        None,
    )
    again = evaluate_core(model, tok, bundle, batch_size=32, **kw)
    row("CORE deterministic (same batch size twice)", str(again == first), again == first)
    other = evaluate_core(model, tok, bundle, batch_size=8, **kw)
    differ = [n for n in first.tasks if first.tasks[n].accuracy != other.tasks[n].accuracy]
    row("CORE batch 32 vs 8 (bf16 kernels may differ on near-ties)", f"{len(differ)} task(s) differ {differ}", None)


def check_export(cfg: ModelConfig) -> None:
    try:
        import transformers
    except ImportError:
        row("HF export", "transformers not installed: skipped", None)
        return
    from nmoe.train.export_hf import ExportError, check_exportable, export_model

    try:
        check_exportable(cfg)
    except ExportError as e:
        row("HF export", f"refused: {e}", None)
        return
    model = build(cfg)
    with tempfile.TemporaryDirectory() as out:
        export_model(cfg, model.state_dict(), out, bos_id=0, dtype=torch.bfloat16)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to("cuda").eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    with torch.no_grad():
        theirs = hf(idx).logits.float()
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
        exact = model(idx).logits  # bf16-valued weights, fp32 math: what bf16 arithmetic itself moves
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours = model(idx).logits
    rel, agree = compare(theirs, ours)
    floor_rel, floor_agree = compare(ours, exact)
    row(
        "HF export bf16 on GPU: logits rel. error / argmax agreement vs nmoe bf16 (floor: nmoe bf16 vs fp32)",
        f"{rel:.2e} / {agree:.3f} ({floor_rel:.2e} / {floor_agree:.3f})",
        rel <= max(5e-2, 2 * floor_rel),
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/moonlet.toml", help="TOML whose [model] shape to use")
    p.add_argument("--bundle", default="../shared/eval/core", help="CORE bundle directory")
    p.add_argument("--max-per-task", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check_model_use.py needs a CUDA GPU")
        return 2
    raw = tomllib.loads(Path(args.config).read_text())["model"]
    cfg = ModelConfig(**raw)
    swa = ModelConfig(
        **{**raw, "attn": "sdpa", "n_kv_heads": 4, "attn_local": "swa", "attn_global_every": 2, "attn_local_window": 32}
    )
    check_decode(cfg, cfg.attn)
    check_decode(swa, "sdpa+swa")
    bench_decode(cfg, args.new_tokens)
    if Path(args.bundle).is_dir():
        check_core(cfg, Path(args.bundle), args.max_per_task)
    else:
        row("CORE", f"bundle {args.bundle} not found: skipped (pass --bundle)", None)
    check_export(cfg)
    print(f"\nmodel-use GPU check on {torch.cuda.get_device_name()} ({args.config})")
    width = max(len(c) for c, _, _ in ROWS)
    for check, result, verdict in ROWS:
        print(f"{verdict:4}  {check:<{width}}  {result}")
    return 1 if any(v == "FAIL" for _, _, v in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
