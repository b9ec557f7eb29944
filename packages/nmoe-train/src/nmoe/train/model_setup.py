"""Build the model of a run on this rank: its slice of the experts, init, device, expert dispatch."""

from __future__ import annotations

import torch

from nmoe.model import Transformer
from nmoe.model.dispatch import RdepDispatch
from nmoe.model.moe import expert_mlp_of
from nmoe.train.checkpoint import Shard
from nmoe.train.config import Config
from nmoe.train.distributed import World
from nmoe.train.nvfp4 import attach_nvfp4_storage
from nmoe.train.optim import expert_names
from nmoe.train.runtime import RunPlan, SetupError


def build_model(cfg: Config, plan: RunPlan, world: World) -> tuple[Transformer, Shard, dict]:
    """(model holding this rank's E / ep_size experts, initialised and on the device; its checkpoint Shard;
    {expert name: NVFP4Tensor} when model.expert_precision = 'nvfp4', else {})."""
    check_expert_precision(cfg, world)
    model = Transformer(cfg.model, world.ep_rank, plan.ep_size)
    model.init_weights(cfg.train.seed)
    model.to(world.device)
    model.set_activation_checkpointing(cfg.runtime.activation_checkpointing)
    experts = expert_names(model)
    stores = attach_nvfp4_storage(model, sorted(experts)) if cfg.model.expert_precision == "nvfp4" else {}
    if plan.ep_size > 1 and cfg.model.has_moe:
        rdep = world.agree(lambda: build_rdep(cfg, plan, world), "starting RDEP")
        model.set_dispatcher(RdepDispatch(rdep, expert_mlp_of(cfg.model)))
    n_experts = cfg.model.n_routed_experts if cfg.model.has_moe else 0
    # expert tensors and what derives from them (their NVFP4 codes and scales): leading dim = local experts
    tensors = frozenset(n for n in model.state_dict() if n in experts or n.rsplit("_nvfp4_", 1)[0] in experts)
    return model, Shard(tensors.__contains__, world.ep_rank, plan.ep_size, n_experts), stores


def check_expert_precision(cfg: Config, world: World) -> None:
    """Refuse model.expert_precision where this GPU cannot run it, with what to use instead."""
    if world.device.type != "cuda" or cfg.model.expert_precision == "bf16" or not cfg.model.has_moe:
        return
    from nmoe.kernels import UnsupportedInput, check_precision_supported

    try:
        check_precision_supported(cfg.model.expert_precision, world.device)
    except UnsupportedInput as err:
        raise SetupError(f"model.expert_precision = {cfg.model.expert_precision!r}: {err}") from None


def rdep_config(cfg: Config, plan: RunPlan):
    """The RdepConfig of a run: one transport shared by every MoE layer."""
    from nmoe.kernels import expert_capacity
    from nmoe.rdep import RdepConfig

    tokens = plan.micro_batch * plan.seq_len
    m = cfg.model
    return RdepConfig(
        dim=m.dim,
        n_routed_experts=m.n_routed_experts,
        top_k=m.top_k,
        max_tokens_per_rank=tokens,
        capacity_margin=cfg.parallel.capacity_margin,
        expert_capacity=expert_capacity(tokens, m.top_k, m.n_routed_experts, m.capacity_factor),
        dtype=plan.amp_dtype or torch.float32,
        wait_timeout_s=cfg.parallel.wait_timeout_s,
    )


def build_rdep(cfg: Config, plan: RunPlan, world: World):
    """An nmoe.rdep.Rdep over this rank's expert-parallel group, on the configured transport."""
    from nmoe.rdep import Rdep

    rcfg = rdep_config(cfg, plan)
    kind = cfg.parallel.transport
    if kind == "auto":
        kind = "nvshmem" if plan.device_type == "cuda" else "shm"
    if kind == "shm":
        if plan.device_type != "cpu":
            raise SetupError(
                "parallel.transport = 'shm' moves rows through host shared memory and runs on CPU ranks only; "
                "use 'nvshmem' (or 'auto') on GPUs"
            )
        from nmoe.rdep import ShmTransport

        return Rdep(rcfg, ShmTransport.for_config(rcfg, group=world.ep_group))
    if plan.device_type != "cuda":
        raise SetupError("parallel.transport = 'nvshmem' needs CUDA GPUs; use 'shm' (or 'auto') on CPU ranks")
    from nmoe.rdep import NvshmemTransport

    try:
        transport = NvshmemTransport.for_config(rcfg, group=world.ep_group)
    except ImportError as err:
        raise SetupError(
            f"{err}. Install it (uv sync --extra nvshmem, or pip install nvshmem4py-cu13) on this GPU machine."
        ) from None
    return Rdep(rcfg, transport)
