"""Routed-expert weights stored in NVFP4 (model.expert_precision = 'nvfp4'), updated by the fused NVFP4 AdamW.

The NVFP4 codes are the weights: there is no fp32 master copy. Each expert tensor `w` of an MoE layer keeps
`w_nvfp4_codes` (uint8, two e2m1 codes a byte), `w_nvfp4_scales` (e4m3, one per 16 elements) and
`w_nvfp4_tscale` (fp32, one per rank's tensor: NVIDIA's layout) as buffers of its module, so they are
checkpointed with the experts. The parameter itself holds the dequantised bf16 values the GEMMs read (on
Hopper there are no FP4 tensor cores) and receives the gradient; `NVFP4ExpertAdamW.step` updates the codes
in place by `optim.nvfp4_rule` and writes the new values back into the parameter.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch

from nmoe.kernels import NVFP4Tensor, dequantize_nvfp4, nvfp4_adamw_, quantize_nvfp4

SUFFIXES = ("_nvfp4_codes", "_nvfp4_scales", "_nvfp4_tscale")


def attach_nvfp4_storage(model: torch.nn.Module, names: Iterable[str]) -> dict[str, NVFP4Tensor]:
    """Quantise each named expert parameter into NVFP4 buffers of its module; the parameter becomes bf16.

    Returns {name: NVFP4Tensor over those buffers} (updated in place by the optimizer).
    """
    stores = {}
    params = dict(model.named_parameters())
    for name in names:
        owner_name, attr = name.rsplit(".", 1)
        owner, p = model.get_submodule(owner_name), params[name]
        q = quantize_nvfp4(p.detach())
        for suffix, tensor in zip(SUFFIXES, (q.codes, q.scales, q.tensor_scale)):
            owner.register_buffer(attr + suffix, tensor)
        stores[name] = NVFP4Tensor(*(getattr(owner, attr + suffix) for suffix in SUFFIXES))
        p.data = dequantize_nvfp4(stores[name], torch.bfloat16)
    return stores


class NVFP4ExpertAdamW(torch.optim.Optimizer):
    """AdamW on NVFP4-stored expert weights (one group); moments fp32, plus a bf16 residual for rule='residual'."""

    def __init__(self, named: dict[str, torch.nn.Parameter], stores: dict[str, NVFP4Tensor], *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, rule: str, dither: float, seed: int):  # fmt: skip
        group = {"params": list(named.values()), "weight_decay": weight_decay, "lr_scale": 1.0, "name": "experts_nvfp4"}
        super().__init__([group], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.rule, self.dither = rule, dither
        self._meta = {p: (name, stores[name], (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31)
                      for name, p in named.items()}  # fmt: skip
        self._window: dict[str, list[torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every expert tensor's codes from its gradient; the parameters get the new values."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                name, q, seed = self._meta[p]
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    if self.rule == "residual":
                        state["residual"] = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
                state["step"] += 1
                stats = nvfp4_adamw_(
                    q, p.grad, state["exp_avg"], state["exp_avg_sq"], step=int(state["step"]), lr=group["lr"],
                    beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], rule=self.rule,
                    seed=seed, dither=self.dither, residual=state.get("residual"),
                )  # fmt: skip
                p.copy_(dequantize_nvfp4(q, p.dtype))
                self._add_to_window(name, stats)

    def load_state_dict(self, state_dict) -> None:
        """As torch's, but the moments stay float32 (torch casts floating state to the bf16 parameters' dtype)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[int(index)]
            for key, value in saved.items():
                if torch.is_tensor(value) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def _add_to_window(self, name: str, stats) -> None:
        counts = torch.stack([stats.flips.double(), stats.sq_err.double(), stats.sq_norm.double(),
                              stats.saturated.double(), torch.tensor(float(stats.numel), device=stats.flips.device,
                                                                     dtype=torch.float64)])  # fmt: skip
        if name in self._window:
            self._window[name][0] += counts
        else:
            self._window[name] = [counts]

    def take_metrics(self) -> dict[str, float]:
        """precision/layerNN/{flip_frac, quant_err, saturated_blocks} over the steps since the last call (one sync)."""
        if not self._window:
            return {}
        by_layer: dict[str, torch.Tensor] = {}
        for name, (counts,) in self._window.items():
            layer = int(name.split(".")[1])  # blocks.<layer>.ffn.w_up
            key = f"precision/layer{layer:02d}"
            by_layer[key] = by_layer[key] + counts if key in by_layer else counts
        self._window.clear()
        keys = list(by_layer)
        rows = torch.stack([by_layer[k] for k in keys]).cpu().tolist()
        out = {}
        for key, (flips, sq_err, sq_norm, sat, numel) in zip(keys, rows):
            out[f"{key}/flip_frac"] = flips / max(numel, 1.0)
            out[f"{key}/quant_err"] = (sq_err / sq_norm) ** 0.5 if sq_norm > 0 else 0.0
            out[f"{key}/saturated_blocks"] = sat
        return out


def precision_metrics(optimizer) -> dict[str, float]:
    """The NVFP4 experts' precision/layerNN/* window metrics of an optimizer (or a chain holding one); {} if none."""
    parts = getattr(optimizer, "parts", (optimizer,))
    return next((p.take_metrics() for p in parts if isinstance(p, NVFP4ExpertAdamW)), {})
