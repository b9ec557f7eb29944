"""Load a trained checkpoint for use (evaluation, sampling, export): the one place that reads its layout.

A checkpoint directory `step_XXXXXXXX/` holds meta.json (with `config_toml`, the resolved config, and each
file's checksum), dense.pt and the expert shards experts_ep{r}.pt of whatever expert-parallel size wrote it
(+ optimizer files, not read here); nmoe.train.checkpoint re-assembles the experts by global index. A run
folder stands for its latest.
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from pathlib import Path

import torch

from nmoe.data import DataError, Tokenizer, dataset_dir
from nmoe.model import Transformer
from nmoe.train import checkpoint as ckpt
from nmoe.train.config import Config, ConfigError, build_config
from nmoe.train.data_setup import prep_options
from nmoe.train.optim import expert_names

_EXPERT_SHARD = re.compile(r"experts_ep(\d+)\.pt")


class LoadError(RuntimeError):
    """A checkpoint, its config or its tokenizer cannot be loaded; the message says what to do."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory `path` names: itself, or the latest checkpoint of a run folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if path.is_dir():
        latest = ckpt.find_latest(path)
        if latest is not None:
            return latest
        raise LoadError(
            f"{path} holds no complete checkpoint (no step_XXXXXXXX/meta.json); pass a checkpoint directory"
        )
    raise LoadError(f"checkpoint {path} does not exist; pass a step_XXXXXXXX directory or a run's checkpoint folder")


def checkpoint_config(step_dir: Path) -> Config:
    """The resolved Config a checkpoint was written with (meta.json's config_toml)."""
    meta = ckpt.read_meta(step_dir)
    if "config_toml" not in meta:
        raise LoadError(f"{step_dir}/meta.json has no config_toml (written by an older nmoe); it cannot be loaded here")
    try:
        return build_config(tomllib.loads(meta["config_toml"]), f"{step_dir}/meta.json", env={})
    except (tomllib.TOMLDecodeError, ConfigError) as e:
        raise LoadError(f"the config stored in {step_dir}/meta.json does not load with this nmoe: {e}") from None


def find_tokenizer(cfg: Config, override: str | Path | None = None) -> Tokenizer:
    """The run's tokenizer: `override`, else data.tokenizer, else the copy in the prepared dataset folder."""
    candidates = [Path(override)] if override else [Path(cfg.data.tokenizer)]
    if not override and not cfg.data.mixture:
        folder = dataset_dir(prep_options(cfg.data))
        candidates += [folder / "tokenizer.json", folder / "tokenizer.tiktoken"]
    for path in candidates:
        if path.is_file():
            try:
                return Tokenizer.load(path)
            except DataError as e:
                raise LoadError(str(e)) from None
    tried = ", ".join(str(p) for p in candidates)
    raise LoadError(f"no tokenizer found (tried {tried}); pass --tokenizer PATH (the run's tokenizer.json)")


def load_model(
    checkpoint_path: str | Path, device: str | torch.device = "cpu", tokenizer: str | Path | None = None
) -> tuple[Config, Transformer, Tokenizer]:
    """(Config, Transformer in eval mode on device with float32 weights, Tokenizer) of a checkpoint or run folder."""
    step_dir = resolve_checkpoint(checkpoint_path)
    cfg = checkpoint_config(step_dir)
    tok = find_tokenizer(cfg, tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise LoadError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.model.vocab_size}: "
            "it is not this run's tokenizer; pass the right one with --tokenizer"
        )
    meta = ckpt.read_meta(step_dir)
    problem = ckpt.verify_files(step_dir, meta, [f for f in ckpt.files_to_check(meta) if "optim" not in f])
    if problem:
        raise LoadError(f"checkpoint {step_dir} is damaged: {problem}; use an earlier step")
    with torch.device(device):
        model = Transformer(cfg.model)  # non-persistent buffers (RoPE tables) are built here
    n_experts = cfg.model.n_routed_experts if cfg.model.has_moe else 0
    shard = ckpt.Shard(expert_names(model).__contains__, 0, 1, n_experts)
    try:
        ckpt.load_shard(step_dir, meta, model, None, shard)
    except ckpt.CheckpointError as e:
        raise LoadError(str(e)) from None
    return cfg, model.eval(), tok


def pick_device(name: str = "auto") -> torch.device:
    """'auto' (cuda if available), 'cpu' or 'cuda'; a clear error when cuda is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the training precision), nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode for the block (an MoE counts no router load in eval), its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
