"""What a run prints and its throughput figures: the console line, the progress bar, perf metrics."""

from __future__ import annotations

import sys
import time

import torch

from nmoe.train.mfu import mfu


class Throughput:
    """Tokens/s over the window since the last log line and over the whole run (for the ETA)."""

    def __init__(self, tokens_seen: int):
        self.window_t = self.run_t = time.perf_counter()
        self.window_tokens = 0
        self.run_tokens0 = tokens_seen

    def add(self, tokens: int) -> None:
        self.window_tokens += tokens

    def take(self, tokens_seen: int, device: torch.device) -> tuple[float, float, float]:
        """(window tokens/s, window seconds, run tokens/s); starts a new window. Syncs the device."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        seconds = max(now - self.window_t, 1e-9)
        window = self.window_tokens / seconds
        run = (tokens_seen - self.run_tokens0) / max(now - self.run_t, 1e-9)
        self.window_t, self.window_tokens = now, 0
        return window, seconds, run


def perf_values(
    tok_s: float, step_time_s: float, flops_per_token: float, world_size: int, peak: float | None, device
) -> dict[str, float]:
    """perf/* metrics of this rank: throughput, step time, MFU (per GPU) and memory in MiB."""
    values = {"perf/tokens_per_s": tok_s, "perf/step_time_s": step_time_s}
    util = mfu(flops_per_token, tok_s / world_size, peak)
    if util is not None:
        values["perf/mfu"] = util
    if device.type == "cuda":
        values["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        values["perf/mem_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
        values["perf/mem_reserved_mib"] = torch.cuda.memory_reserved(device) / 2**20
    return values


def step_line(step: int, steps: int, loss: float, lr: float, perf: dict[str, float], eta_s: float, cpu: bool) -> str:
    """One console line: step, loss, lr, throughput, MFU, memory, ETA."""
    if "perf/mfu" in perf:
        mfu_txt = f"MFU {perf['perf/mfu'] * 100:.1f}%"
    else:
        mfu_txt = "MFU n/a (CPU)" if cpu else "MFU n/a (unknown GPU)"
    mem = f"mem {perf['perf/peak_mem_gib']:.1f} GiB | " if "perf/peak_mem_gib" in perf else ""
    return (
        f"step {step}/{steps} | loss {loss:.4f} | lr {lr:.2e} | {perf['perf/tokens_per_s'] / 1e3:.1f}k tok/s | "
        f"{mfu_txt} | {mem}ETA {format_seconds(eta_s)}"
    )


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Console:
    """Lines to the log (rank 0 only), through the progress bar when one is shown."""

    def __init__(self, log, enabled: bool, progress: bool, name: str, total: int, initial: int):
        self.log, self.enabled = log, enabled
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            # On a terminal: a live bar. In a log file: no carriage-return spam; the console lines carry progress.
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=name,
                unit="step",
                dynamic_ncols=True,
                leave=True,
                disable=not sys.stderr.isatty(),
            )

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def tick(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
