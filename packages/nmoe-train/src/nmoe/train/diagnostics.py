"""Where a non-finite loss or gradient first appears (for the error message that stops a run)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def locate_nonfinite(model: torch.nn.Module, forward: Callable[[], object]) -> str:
    """Name the first module whose output (or else parameter gradient) is not finite.

    `forward()` reruns the last batch through the eager model (module hooks do not fire inside a
    compiled graph); gradients are read as the failed step left them.
    """
    found: list[str] = []
    hooks = []
    for name, module in model.named_modules():

        def hook(mod, args, out, name=name):
            tensors = out if isinstance(out, (tuple, list)) else (out,)
            if not found and any(_nonfinite(t) for t in tensors):
                found.append(name or "<model>")

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    if found:
        return f"forward output of `{found[0]}`"
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"gradient of `{name}` (forward was finite)"
    return "not reproducible on the last batch"


def _nonfinite(t) -> bool:
    return torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())
