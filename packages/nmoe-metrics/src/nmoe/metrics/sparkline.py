"""Unicode sparklines for a terminal: one character per bucket of a series."""

from __future__ import annotations

import math
from collections.abc import Sequence

BARS = "▁▂▃▄▅▆▇█"
NOT_FINITE = "×"  # a bucket holding any NaN/inf: one diverged step must stay visible after downsampling


def downsample(values: Sequence[float], width: int) -> list[float | None]:
    """Mean of each of `min(width, len(values))` contiguous buckets; None for a bucket holding any NaN/inf."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    n = len(values)
    n_buckets = min(width, n)
    out: list[float | None] = []
    for b in range(n_buckets):
        bucket = values[b * n // n_buckets : (b + 1) * n // n_buckets]
        out.append(sum(v / len(bucket) for v in bucket) if all(math.isfinite(v) for v in bucket) else None)
    return out


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """At most `width` characters from ▁ (series minimum) to █ (maximum); × marks buckets holding NaN/inf."""
    buckets = downsample(values, width)
    finite = [v for v in buckets if v is not None]
    if not finite:
        return NOT_FINITE * len(buckets)
    lo, hi = min(finite), max(finite)
    span = hi - lo

    def bar(v: float | None) -> str:
        if v is None:
            return NOT_FINITE
        if span == 0 or not math.isfinite(span):
            return BARS[len(BARS) // 2]
        return BARS[min(len(BARS) - 1, int((v - lo) / span * len(BARS)))]

    return "".join(bar(v) for v in buckets)
