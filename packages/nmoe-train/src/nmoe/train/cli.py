"""`nmoe-train CONFIG.toml`: prepare missing data, train, checkpoint, resume."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

EPILOG = textwrap.dedent("""\
    examples:
      uv run nmoe-train configs/tiny.toml                 # CPU, about a minute
      uv run nmoe-train configs/moonlet.toml --dry-run    # parameter/FLOP/memory summary only
      uv run nmoe-train configs/tiny.toml --set train.steps=50 --set optim.lr=1e-3
      uv run torchrun --standalone --nproc_per_node=8 -m nmoe.train configs/moonlight.toml
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
    p.add_argument(
        "--extend-steps",
        type=int,
        default=0,
        metavar="N",
        help="train until train.steps + N (past a finished run's end) at the schedule's final learning rate; "
        "recorded in the checkpoint, so rerunning the same command resumes to the same end",
    )
    return p


def _parse_overrides(items: list[str]) -> dict[str, str]:
    from nmoe.train.config import ConfigError

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as section.key=value, e.g. --set train.steps=100")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def dry_run(cfg, world_size: int | None = None, cuda_available: bool | None = None) -> str:
    """The --dry-run report: config identity, how it runs here (the trainer's own plan) and the model summary."""
    from nmoe.model import model_summary
    from nmoe.train.runtime import plan_run, world_size_from_env

    plan = plan_run(cfg, world_size_from_env() if world_size is None else world_size, cuda_available)
    summary = model_summary(
        cfg.model,
        cfg.train.seq_len,
        batch_size=plan.micro_batch,
        act_bytes=plan.act_bytes,
        checkpointing=cfg.runtime.activation_checkpointing,
    )
    tokens = plan.tokens_per_step
    lines = [
        f"config       {cfg.source}",
        f"fingerprint  {cfg.fingerprint}",
        f"run name     {cfg.name}",
        f"device       {plan.device_type}, {plan.precision}",
        f"world        {plan.world_size} rank(s), expert-parallel size {plan.ep_size}",
        f"tokens/step  {tokens:,} ({plan.micro_batch} × {cfg.train.seq_len} × {plan.grad_accum} accum "
        f"× {plan.world_size} rank(s))",
        f"total tokens {tokens * cfg.train.steps:,} over {cfg.train.steps:,} steps",
        f"train FLOPs  {summary.flops_per_token * tokens * cfg.train.steps:.3e}",
        "",
        summary.table(),
    ]
    if cfg.model.has_moe:
        lines += ["", *expert_memory_lines(cfg, summary.routed_expert_params)]
    return "\n".join(lines)


def expert_memory_lines(cfg, routed_params: int) -> list[str]:
    """Bytes per routed-expert parameter (weights + optimizer state) of every precision mode; `*` marks the config's."""
    from nmoe.kernels import expert_param_bytes

    modes = [("bf16", "nearest"), ("fp8", "nearest")] + [
        ("nvfp4", r) for r in ("nearest", "seed", "stochastic", "residual")
    ]
    mine = (cfg.model.expert_precision, cfg.optim.nvfp4_rule if cfg.model.expert_precision == "nvfp4" else "nearest")
    lines = [
        f"routed experts: {routed_params:,} params; bytes/param of weights + optimizer state, + the bf16/e4m3 copy",
        "the GEMMs read (transient for bf16/fp8; kept between steps for nvfp4), per mode:",
    ]
    for mode, rule in modes:
        per = expert_param_bytes(mode, rule)
        total, copy = per["total"], per["transient"]
        label = mode if mode != "nvfp4" else f"nvfp4 ({rule})"
        mark = "*" if (mode, rule) == mine else " "
        gib = (total + copy) * routed_params / 2**30
        lines.append(f" {mark} {label:<20} {total:>8.4f} + {copy:g} B/param  {gib:8.2f} GiB")
    return lines


def main(argv: list[str] | None = None, hooks=()) -> int:
    """Entry point of `nmoe-train` and `python -m nmoe.train`; returns the exit status."""
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
    from nmoe.train.runtime import SetupError

    try:
        cfg = load_config(args.config, overrides=_parse_overrides(args.overrides))
        if args.dry_run:
            print(f"[nmoe] config {cfg.source} fingerprint {cfg.fingerprint}", flush=True)
            print(dry_run(cfg))
            return 0
    except (ConfigError, SetupError) as e:
        print(f"nmoe-train: config error: {e}", file=sys.stderr)
        return 2
    if args.extend_steps < 0:
        print("nmoe-train: error: --extend-steps must be >= 0", file=sys.stderr)
        return 2
    return _train(cfg, args.extend_steps, hooks)


def _train(cfg, extend_steps: int, hooks) -> int:
    from nmoe.data import DataError
    from nmoe.rdep import RdepCapacityError, RdepTimeoutError
    from nmoe.train.checkpoint import CheckpointError
    from nmoe.train.data_setup import DataNotReady
    from nmoe.train.distributed import PeerLost, shutdown
    from nmoe.train.loop import NonFiniteError, Trainer
    from nmoe.train.record import RecordError
    from nmoe.train.runtime import SetupError

    rank = os.environ.get("RANK", "0")
    prefix = "nmoe-train: " if os.environ.get("WORLD_SIZE", "1") == "1" else f"nmoe-train [rank {rank}]: "
    try:
        trainer = Trainer(cfg, hooks=hooks)
        if rank == "0":
            print(f"[nmoe] config {cfg.source} fingerprint {cfg.fingerprint}", flush=True)
        if extend_steps:
            trainer.extend(extend_steps)
        result = trainer.run()
        trainer.world.close()
    except (
        DataError,
        DataNotReady,
        CheckpointError,
        NonFiniteError,
        SetupError,
        PeerLost,
        RdepTimeoutError,
        RdepCapacityError,
        RecordError,
    ) as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        shutdown()
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}aborted (second interrupt); the last checkpoint is intact", file=sys.stderr)
        shutdown()
        return 130
    if rank == "0":
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
