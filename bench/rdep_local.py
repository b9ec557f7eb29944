"""What RDEP costs on one GPU at ep = 1 against LocalDispatch: time and host syncs per MoE layer (fwd + bwd).

    PYTHONPATH=/tmp/site:$(ls -d packages/*/src | paste -sd:) python3 bench/rdep_local.py --out rdep_local.json

Same tokens, routing and expert weights for every variant: LocalDispatch's fused path (gather and combine
fused into the GEMMs), LocalDispatch composed (sort + gather -> expert_mlp -> weighted combine) and RDEP with
one NVSHMEM PE (dispatch writes into its own symmetric buffer, combine returns) -> expert_mlp. Host syncs are
counted with torch.cuda.set_sync_debug_mode("warn").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

SHAPES = {"moonlet": dict(dim=1024, hidden=704, experts=64, top_k=6, tokens=12 * 2048)}


def layer_inputs(shape: dict, device):
    gen = torch.Generator(device).manual_seed(0)
    d, h, e, k, t = shape["dim"], shape["hidden"], shape["experts"], shape["top_k"], shape["tokens"]
    x = torch.randn(t, d, generator=gen, device=device).bfloat16()
    ids = torch.rand(t, e, generator=gen, device=device).topk(k, dim=1).indices
    w = torch.softmax(torch.rand(t, k, generator=gen, device=device), dim=1)
    w_up = (torch.randn(e, d, 2 * h, generator=gen, device=device) / d**0.5).bfloat16().requires_grad_()
    w_down = (torch.randn(e, h, d, generator=gen, device=device) / h**0.5).bfloat16().requires_grad_()
    return x, ids, w, w_up, w_down


def timed(fn, iters: int) -> tuple[float, float]:
    """(median ms, host syncs per call) of fn() (fwd + bwd)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught) / iters - 1  # minus end.synchronize()
    return sorted(times)[len(times) // 2], max(syncs, 0.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="rdep_local.json")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    from nmoe.kernels import expert_mlp
    from nmoe.model.dispatch import LocalDispatch, RdepDispatch
    from nmoe.rdep import NvshmemTransport, Rdep, RdepConfig

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    init = f"file://{tempfile.mkdtemp()}/init"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    rows = []
    for name, shape in SHAPES.items():
        x, ids, w, w_up, w_down = layer_inputs(shape, device)
        cfg = RdepConfig(dim=shape["dim"], n_routed_experts=shape["experts"], top_k=shape["top_k"],
                         max_tokens_per_rank=shape["tokens"], capacity_margin=1.0)  # fmt: skip
        rdep = RdepDispatch(Rdep(cfg, NvshmemTransport.for_config(cfg)), expert_mlp)
        variants = {
            "LocalDispatch fused (moe_experts)": LocalDispatch(shape["experts"]),
            "LocalDispatch composed (expert_mlp)": LocalDispatch(shape["experts"], expert_mlp),
            "RdepDispatch ep=1 (NVSHMEM, 1 PE)": rdep,
        }
        dy = torch.randn_like(x)
        outs = {}
        for label, dispatcher in variants.items():

            def step(dispatcher=dispatcher):
                y = dispatcher.experts(x, ids, w, w_up, w_down)
                y.backward(dy)
                return y

            outs[label] = step().float()
            w_up.grad = w_down.grad = None
            ms, syncs = timed(step, args.iters)
            rows.append({"shape": name, "variant": label, "ms_fwd_bwd": ms, "host_syncs_per_layer": syncs})
        ref = outs["LocalDispatch fused (moe_experts)"]
        for label, y in outs.items():
            err = ((y - ref).norm() / ref.norm()).item()
            next(r for r in rows if r["variant"] == label)["rel_err_vs_fused"] = err
    result = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['device']}, {result['date']}: one MoE layer fwd+bwd, moonlet shape (24576 tokens, E=64, top-6)")
    print("| variant | ms fwd+bwd | host syncs / layer | rel. err vs fused |\n| --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['ms_fwd_bwd']:.2f} | {r['host_syncs_per_layer']:.0f} | {r['rel_err_vs_fused']:.1e} |"
        )


if __name__ == "__main__":
    main()
