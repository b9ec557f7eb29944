"""`nmoe-train CONFIG.toml`: prepare missing data, train, checkpoint, resume."""

from __future__ import annotations

import argparse
import sys
import textwrap

EPILOG = textwrap.dedent("""\
    examples:
      uv run nmoe-train configs/tiny.toml                 # CPU, about a minute
      uv run nmoe-train configs/moonlet.toml --dry-run    # parameter/FLOP/memory summary only
      uv run nmoe-train configs/tiny.toml --set train.steps=50 --set optim.lr=1e-3
      NMOE_TRAIN__STEPS=50 uv run nmoe-train configs/tiny.toml

    Environment overrides: NMOE_<SECTION>__<KEY>=value (e.g. NMOE_TRAIN__STEPS=100,
    NMOE_RUNTIME__COMPILE=true). Every key: nmoe-train --help-config.
    A run resumes automatically from {checkpoint.dir}/{run_name}/latest (checkpoint.resume = 'auto').
    Metrics: uv run nmoe-metrics runs / show RUN_ID.""")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmoe-train",
        description="Train a DeepSeek-shaped MoE model from one TOML config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="TOML config file, e.g. configs/tiny.toml")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, fingerprint and model summary (params, FLOPs/token, memory), then exit",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable); applied after environment overrides",
    )
    p.add_argument(
        "--help-config", action="store_true", help="list every config section and key with its type, default and range"
    )
    return p


def _parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"nmoe-train: error: --set {item!r}: write it as section.key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def dry_run(cfg) -> str:
    """The --dry-run report: config identity and the model summary table."""
    from nmoe.model import model_summary

    summary = model_summary(
        cfg.model,
        cfg.train.seq_len,
        batch_size=cfg.train.batch_size,
        act_bytes=4 if cfg.runtime.dtype == "fp32" or cfg.runtime.device == "cpu" else 2,
    )
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
    lines = [
        f"config       {cfg.source}",
        f"fingerprint  {cfg.fingerprint}",
        f"run name     {cfg.name}",
        f"tokens/step  {tokens_per_step:,} ({cfg.train.batch_size} × {cfg.train.seq_len} × {cfg.train.grad_accum} accum)",
        f"total tokens {tokens_per_step * cfg.train.steps:,} over {cfg.train.steps:,} steps",
        f"train FLOPs  {summary.flops_per_token * tokens_per_step * cfg.train.steps:.3e}",
        "",
        summary.table(),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nmoe.train.config import ConfigError, describe_keys, load_config

    if args.help_config:
        print(describe_keys())
        return 0
    if not args.config:
        build_parser().print_usage()
        print(
            "nmoe-train: error: a config file is required, e.g. `uv run nmoe-train configs/tiny.toml`", file=sys.stderr
        )
        return 2
    try:
        cfg = load_config(args.config, overrides=_parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"nmoe-train: config error: {e}", file=sys.stderr)
        return 2
    print(f"[nmoe] config {cfg.source} fingerprint {cfg.fingerprint}", flush=True)
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    return _train(cfg)


def _train(cfg) -> int:
    from nmoe.data import DataError
    from nmoe.train.checkpoint import CheckpointError
    from nmoe.train.data_setup import DataNotReady
    from nmoe.train.loop import NonFiniteError, SetupError, Trainer

    try:
        result = Trainer(cfg).run()
    except (DataError, DataNotReady, CheckpointError, NonFiniteError, SetupError) as e:
        print(f"nmoe-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nmoe-train: aborted (second interrupt); the last checkpoint is intact", file=sys.stderr)
        return 130
    summary = f"[nmoe] {result.status}: run {result.run_id}, step {result.step}"
    if result.val_loss is not None:
        summary += f", val loss {result.val_loss:.4f}"
    if result.checkpoint:
        summary += f", checkpoint {result.checkpoint}"
    print(summary, flush=True)
    if result.status == "interrupted":
        return 128 + (result.stop_signal or 15)  # the shell convention: 143 for SIGTERM, 130 for SIGINT
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
