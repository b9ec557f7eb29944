"""GPU check: is training bitwise repeatable? (run by hand on a CUDA machine; not collected by pytest)

    uv run python packages/nmoe-train/tests/gpu_check_determinism.py [--config configs/moonlet.toml] [--layers 4]

Bitwise resume on the GPU needs every kernel of a step to give the same bits for the same inputs. For the eager
model and the compiled one: the same init, the same batch, forward + backward twice, every gradient compared bit
for bit (the parameters that differ are named with their largest difference, so a non-deterministic kernel can be
located); then three AdamW steps twice from the same state, the losses and the weights compared. With
--deterministic, under torch.use_deterministic_algorithms (warn only) and CUBLAS_WORKSPACE_CONFIG=:4096:8. A table
is printed last; exit code 1 when something differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from nmoe.model import Transformer
from nmoe.train.config import OptimConfig, load_config
from nmoe.train.optim import build_optimizer

ROWS: list[tuple[str, bool, str]] = []
DEVICE = torch.device("cuda")


def build(cfg, compiled: bool):
    model = Transformer(cfg).to(DEVICE)
    model.init_weights(0)
    return model, (torch.compile(model, fullgraph=True) if compiled else model)


def grads_of(run, model, idx, tgt) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = run(idx, tgt)
    (out.loss + out.aux_loss).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_gradients(cfg, compiled: bool, idx, tgt) -> None:
    model, run = build(cfg, compiled)
    first = grads_of(run, model, idx, tgt)
    second = grads_of(run, model, idx, tgt)
    differ = [n for n in first if not torch.equal(first[n], second[n])]
    gaps = [f"{n} {(first[n] - second[n]).abs().max().item():.1e}" for n in differ[:8]]
    where = ", ".join(gaps) + (f" (+{len(differ) - 8} more)" if len(differ) > 8 else "")
    ROWS.append((f"gradients, {'compiled' if compiled else 'eager'}", not differ, where or "all equal"))


def train(cfg, compiled: bool, batches) -> tuple[list[float], list[torch.Tensor]]:
    model, run = build(cfg, compiled)
    opt = build_optimizer(model, OptimConfig(lr=1e-3), fused=DEVICE.type == "cuda")
    losses = []
    for idx, tgt in batches:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = run(idx, tgt)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias()
        losses.append(out.loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def check_steps(cfg, compiled: bool, batches) -> None:
    (loss_a, w_a), (loss_b, w_b) = train(cfg, compiled, batches), train(cfg, compiled, batches)
    same = loss_a == loss_b and all(torch.equal(a, b) for a, b in zip(w_a, w_b))
    ROWS.append((f"3 AdamW steps, {'compiled' if compiled else 'eager'}", same, f"losses {loss_a} / {loss_b}"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/moonlet.toml")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--cpu", action="store_true", help="smoke-run the script on the CPU (e.g. configs/tiny.toml)")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(warn_only)")
    args = p.parse_args()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    global DEVICE
    DEVICE = torch.device("cpu" if args.cpu else "cuda")
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check_determinism.py needs a CUDA GPU")
        return 2
    cfg = load_config(args.config).model
    cfg = dataclasses.replace(cfg, n_layers=args.layers, n_dense_layers=min(cfg.n_dense_layers, args.layers - 1))
    gen = torch.Generator().manual_seed(0)
    batches = [
        tuple(torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(DEVICE) for _ in range(2))
        for _ in range(3)
    ]
    for compiled in (False, True):
        for check in (check_gradients, check_steps):
            try:
                check(cfg, compiled, *((batches[0]) if check is check_gradients else (batches,)))
            except Exception as err:  # report every check from one device call
                ROWS.append((f"{check.__name__}, {'compiled' if compiled else 'eager'}", False, repr(err)[:300]))
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    mode = ", deterministic algorithms" if args.deterministic else ""
    print(f"\n| check ({name}{mode}, {args.layers} layers, {args.batch}x{args.seq}) | same bits | "
          "detail |\n|---|---|---|")  # fmt: skip
    for name, ok, detail in ROWS:
        print(f"| {name} | {'yes' if ok else 'NO'} | {detail} |")
    return 0 if all(ok for _, ok, _ in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
