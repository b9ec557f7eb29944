"""What a finished run does last: CORE evaluation and the leaderboard entry (the speedrun flow)."""

from __future__ import annotations

from nmoe.data import Tokenizer
from nmoe.train.core_eval import CoreResult, evaluate_core
from nmoe.train.leaderboard import append_entry, speedrun_entry


def run_core(trainer, step: int) -> CoreResult | None:
    """CORE over eval.core_bundle on every rank (expert-parallel forwards need all of them); None when unset."""
    cfg = trainer.cfg
    if not cfg.eval.core_bundle:
        return None
    trainer.log(f"[nmoe] CORE evaluation of step {step} over {cfg.eval.core_bundle}")
    sharded = trainer.plan.ep_size > 1  # RDEP buffers hold micro_batch x seq_len tokens per rank
    core = evaluate_core(
        trainer.model,
        Tokenizer.load(cfg.data.tokenizer),
        cfg.eval.core_bundle,
        device=trainer.device,
        batch_size=trainer.plan.micro_batch if sharded else 32,
        max_len=cfg.train.seq_len if sharded else None,
        max_per_task=cfg.eval.core_max_per_task or None,
        progress=cfg.runtime.progress and trainer.world.is_main,
    )
    trainer.log(core.table())
    return core


def core_values(core: CoreResult) -> dict[str, float]:
    """core/score and core/<task> (centered accuracy) metrics."""
    return {"core/score": core.score, **{f"core/{name}": s.centered for name, s in core.tasks.items()}}


def append_to_leaderboard(trainer, core: CoreResult | None) -> None:
    """One entry in eval.leaderboard (rank 0 only; atomic, schema-checked)."""
    cfg, state = trainer.cfg, trainer.state
    if not cfg.eval.leaderboard or not trainer.world.is_main:
        return
    gpu = trainer.device_name() if trainer.device.type == "cuda" else "cpu"
    entry = speedrun_entry(
        cfg,
        run_id=state.run_id,
        git_rev=trainer.git_rev,
        gpu=gpu,
        gpu_count=trainer.world.world_size if trainer.device.type == "cuda" else 0,
        steps=state.step,
        tokens=state.tokens_seen,
        wall_clock_s=state.train_seconds,
        val_loss=state.last_val_loss,
        target_reached=state.target_reached,
        core_result=core,
    )
    append_entry(cfg.eval.leaderboard, entry)
    trainer.log(f"[nmoe] leaderboard: appended run {state.run_id} to {cfg.eval.leaderboard}")
