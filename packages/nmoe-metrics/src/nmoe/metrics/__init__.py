"""nmoe.metrics: per-rank DuckDB metrics, a SQLite experiment registry, and the `nmoe-metrics` CLI."""

from nmoe.metrics.reader import (
    ArrayRow,
    MetricRow,
    latest,
    list_metric_runs,
    list_ranks,
    read_arrays,
    read_metrics,
    run_headers,
)
from nmoe.metrics.registry import FINAL_STATUSES, Registry
from nmoe.metrics.sparkline import sparkline
from nmoe.metrics.writer import MetricsWriter, rank_path

__all__ = [
    "ArrayRow",
    "FINAL_STATUSES",
    "MetricRow",
    "MetricsWriter",
    "Registry",
    "latest",
    "list_metric_runs",
    "list_ranks",
    "rank_path",
    "read_arrays",
    "read_metrics",
    "run_headers",
    "sparkline",
]
