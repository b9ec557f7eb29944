"""TOML → typed, frozen config sections; env overrides; fingerprint.

One config system for nmoe. Each section is a frozen dataclass whose fields carry
`metadata={"help": ..., "range": (lo, hi) | "choices": (...), "operational": bool}`.
`operational` keys (paths, logging cadence) do not enter the fingerprint: changing them
never changes the numbers a run produces, so a run may resume with them changed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nmoe.data import PrepOptions, prep_option_fields
from nmoe.model.config import ModelConfig, config_field, field_problem

ENV_PREFIX = "NMOE_"


class ConfigError(ValueError):
    """A config file or override is invalid; the message says what to change."""


def _data_fields() -> list[tuple[str, Any, Any]]:
    """The [data] keys: every PrepOptions field (nmoe-data's one schema, shared with the nmoe-data CLI) plus the
    trainer's own keys."""
    hints = typing.get_type_hints(PrepOptions)
    keys = []
    for f in prep_option_fields():
        meta = f.metadata
        spec = config_field(
            f.default,
            meta.get("help", ""),
            range=meta.get("range"),
            choices=meta.get("choices"),
            operational=meta.get("operational", False),
        )
        keys.append((f.name, hints[f.name], spec))
    mixture = config_field("", "mixture TOML (several prepared datasets with weights); overrides name/source")
    verify = config_field(
        True,
        "sha256-check every shard at start (sizes, dtypes and max token ids are always checked); "
        "turn off for very large datasets on trusted storage",
        operational=True,
    )
    return keys + [("mixture", str, mixture), ("verify_shards", bool, verify)]


DataConfig = dataclasses.make_dataclass("DataConfig", _data_fields(), frozen=True, kw_only=True)
DataConfig.__module__ = __name__


@dataclass(frozen=True)
class TrainConfig:
    steps: int = config_field(help="optimizer steps in the run", range=(1, None))
    seq_len: int = config_field(help="tokens per sequence", range=(8, 1 << 20))
    global_batch_size: int = config_field(
        help="sequences per optimizer step over all ranks (the numerics depend on this, not on how it is split)",
        range=(1, 1 << 24),
    )
    batch_size: int = config_field(
        0,
        "sequences per forward pass on one rank (0: global_batch_size / world size); gradients accumulate over "
        "global_batch_size / (batch_size x world size) micro-batches",
        range=(0, 1 << 16),
        operational=True,
    )
    grad_clip: float = config_field(1.0, "global grad-norm clip (0: off)", range=(0.0, None))
    seed: int = config_field(0, "seed for weights and data order", range=(0, (1 << 63) - 1))
    log_every: int = config_field(10, "console/metrics line every N steps", range=(1, None), operational=True)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = config_field(help="peak learning rate", range=(0.0, 10.0))
    weight_decay: float = config_field(0.1, "AdamW decoupled weight decay on matrices", range=(0.0, 10.0))
    beta1: float = config_field(0.9, "AdamW beta1", range=(0.0, 1.0))
    beta2: float = config_field(0.95, "AdamW beta2", range=(0.0, 1.0))
    eps: float = config_field(1e-8, "AdamW epsilon (> 0: with 0 an all-zero gradient gives 0/0)", range=(1e-30, 1.0))
    schedule: str = config_field(
        "wsd", "wsd: warmup → constant → linear warmdown; cosine: warmup → cosine", choices=("wsd", "cosine")
    )
    warmup: int = config_field(0, "warmup steps", range=(0, None))
    warmdown: int = config_field(0, "final linear-decay steps (wsd)", range=(0, None))
    min_lr_ratio: float = config_field(0.0, "final lr as a fraction of lr", range=(0.0, 1.0))
    decay_embeddings: bool = config_field(False, "apply weight decay to embeddings and the output head")
    embed_lr_scale: float = config_field(1.0, "lr multiplier for embeddings", range=(0.0, 100.0))
    optimizer: str = config_field(
        "adamw",
        "adamw: AdamW for every parameter; muon: Muon (momentum orthogonalised per matrix, per routed expert) for "
        "the attention, FFN and expert matrices, AdamW for embeddings, head, norms, biases and routers",
        choices=("adamw", "muon"),
    )
    muon_lr: float = config_field(
        0.0,
        "peak lr of the Muon matrices, scheduled like lr (0: optim.lr). Updates are scaled to AdamW's RMS "
        "(0.2 sqrt(max(rows, cols))), so AdamW's lr is a sound start",
        range=(0.0, 10.0),
    )
    muon_momentum: float = config_field(0.95, "Muon momentum (an EMA of the gradient)", range=(0.0, 0.999))
    muon_nesterov: bool = config_field(True, "Muon: Nesterov-style update (1 - momentum) g + momentum m")
    muon_ns_steps: int = config_field(5, "Muon: Newton-Schulz quintic steps per update", range=(1, 20))
    muon_weight_decay: float = config_field(
        0.1,
        "Muon decoupled weight decay (w *= 1 - lr x this), as AdamW's weight_decay: with RMS-matched updates "
        "the same value keeps the weights' scale bounded in long runs",
        range=(0.0, 10.0),
    )
    nvfp4_rule: str = config_field(
        "stochastic",
        "how NVFP4-stored expert weights are re-quantised after each AdamW update (model.expert_precision = "
        "'nvfp4'): nearest; seed (the seed project's resonant dither on codes that would not move); stochastic "
        "(unbiased stochastic rounding; the measured best, bench/RESULTS.md); residual (error feedback through a "
        "bf16 buffer, +2 bytes/param)",
        choices=("nearest", "seed", "stochastic", "residual"),
    )
    nvfp4_dither: float = config_field(
        0.25, "dither amplitude of nvfp4_rule = 'seed', in the normalised FP4 domain", range=(0.0, 1.0)
    )


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = config_field(
        "runs/checkpoints", "checkpoint root; a run writes {dir}/{run_name}/step_XXXXXXXX", operational=True
    )
    save_every: int = config_field(
        0, "save every N steps (0: only at the end and on SIGTERM/SIGINT)", range=(0, None), operational=True
    )
    keep_last: int = config_field(3, "checkpoints kept (older ones deleted)", range=(1, None), operational=True)
    resume: str = config_field(
        "auto",
        "'auto': continue from the latest checkpoint; 'never': start fresh (refuses if one exists); or a path: a step_XXXXXXXX checkpoint or a run's folder (its latest)",
        operational=True,
    )


@dataclass(frozen=True)
class MetricsConfig:
    dir: str = config_field("runs/metrics", "DuckDB metrics root", operational=True)
    experiments_db: str = config_field("runs/experiments.sqlite", "SQLite experiment registry", operational=True)
    flush_every_s: float = config_field(2.0, "background flush period", range=(0.05, 3600.0), operational=True)


@dataclass(frozen=True)
class EvalConfig:
    eval_every: int = config_field(
        0, "validation loss every N steps (0: only at the end)", range=(0, None), operational=True
    )
    eval_batches: int = config_field(8, "validation batches per evaluation (fixed set)", range=(1, None))
    target_loss: float = config_field(0.0, "stop when validation loss ≤ this (0: off)", range=(0.0, None))
    core_bundle: str = config_field(
        "", "CORE eval bundle directory, run at the end of the run (empty: no CORE); see nmoe-eval", operational=True
    )
    core_max_per_task: int = config_field(
        0, "CORE items per task (0: all; fewer is a quick, noisier estimate)", range=(0, None), operational=True
    )
    leaderboard: str = config_field("", "LEADERBOARD.json to append the run's entry to (empty: none)", operational=True)


@dataclass(frozen=True)
class RuntimeConfig:
    run_name: str = config_field("", "run name (default: the config file's stem)", operational=True)
    device: str = config_field("auto", "auto: cuda if available else cpu", choices=("auto", "cpu", "cuda"))
    dtype: str = config_field("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=("auto", "bf16", "fp32"))
    compile: bool = config_field(False, "torch.compile the model")
    activation_checkpointing: str = config_field(
        "none",
        "re-run a block's forward in backward instead of keeping its activations: none, moe (the MoE blocks) or "
        "all; less memory (larger micro-batches) for about one more forward of those blocks",
        choices=("none", "moe", "all"),
        operational=True,
    )
    nvtx: bool = config_field(False, "emit NVTX ranges (forward, backward, optimizer, comm)", operational=True)
    progress: bool = config_field(True, "show a progress bar", operational=True)


@dataclass(frozen=True)
class ParallelConfig:
    ep_size: int = config_field(
        0,
        "expert-parallel size: ranks that share one copy of the routed experts (0: the world size); must divide "
        "the world size and model.n_routed_experts. The rest of the model is data-parallel over every rank",
        range=(0, 1 << 16),
        operational=True,
    )
    transport: str = config_field(
        "auto",
        "expert-parallel transport: nvshmem (GPUs of one node), shm (CPU processes of one host), auto (nvshmem on "
        "CUDA, shm on CPU)",
        choices=("auto", "nvshmem", "shm"),
        operational=True,
    )
    backend: str = config_field(
        "auto",
        "torch.distributed backend for the data-parallel reductions: auto (nccl with one GPU per rank, gloo on CPU "
        "or when ranks share a GPU), nccl, gloo",
        choices=("auto", "nccl", "gloo"),
        operational=True,
    )
    capacity_margin: float = config_field(
        2.0,
        "RDEP receive buffer = tokens per rank x top_k x this many rows per owner; a step that routes more to one "
        "owner stops with an error naming this key (model.capacity_factor drops instead)",
        range=(0.01, 1024.0),
        operational=True,
    )
    wait_timeout_s: float = config_field(
        300.0,
        "a rank waiting for a peer's expert-parallel signal gives up after this",
        range=(1.0, 86400.0),
        operational=True,
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "metrics": MetricsConfig,
    "eval": EvalConfig,
    "runtime": RuntimeConfig,
    "parallel": ParallelConfig,
}
REQUIRED_SECTIONS = ("model", "data", "train", "optim")


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    metrics: MetricsConfig
    eval: EvalConfig
    runtime: RuntimeConfig
    parallel: ParallelConfig
    source: str = ""  # the file it came from (not part of the fingerprint)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Resolved config as {section: {key: value}} (defaults filled in)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        """Resolved config as TOML text (round-trips through load_config)."""
        return dump_toml(self.to_dict())

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical resolved config, operational keys excluded."""
        return hashlib.sha256(_canonical_json(fingerprint_items(self)).encode()).hexdigest()

    @property
    def name(self) -> str:
        return self.runtime.run_name or (Path(self.source).stem if self.source else "run")


def fingerprint_items(cfg: Config) -> dict[str, Any]:
    """Flat {section.key: value} of everything that changes a run's numbers."""
    items = {}
    for section, cls in SECTIONS.items():
        values = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("operational", False):
                items[f"{section}.{f.name}"] = getattr(values, f.name)
    return items


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def load_config(
    path: str | Path, env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Config:
    """Read a TOML file, apply `NMOE_<SECTION>__<KEY>` env overrides, validate, freeze."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such config file. Configs shipped with nmoe live in configs/ (e.g. configs/tiny.toml)."
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return build_config(raw, str(path), os.environ if env is None else env, overrides or {})


def build_config(
    raw: dict[str, Any], where: str, env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Config:
    """Validate a parsed TOML mapping (plus string overrides `section.key=value`) into a Config."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise ConfigError(_unknown(where, key, list(SECTIONS), "section"))
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: `{key}` must be a [{key}] table, got {type(value).__name__}")
    origins: dict[str, str] = {}  # section.key -> the override that set it (errors name it, not the file)
    for origin, section, key, text in _override_items(env or {}, overrides or {}):
        if section not in SECTIONS:
            raise ConfigError(_unknown(origin, section, list(SECTIONS), "section"))
        cls = SECTIONS[section]
        names = [f.name for f in dataclasses.fields(cls)]
        if key not in names:
            raise ConfigError(_unknown(origin, f"{section}.{key}", [f"{section}.{n}" for n in names], "key"))
        ftype = _field_types(cls)[key]
        raw.setdefault(section, {})[key] = _parse_text(text, ftype, f"{origin}", f"{section}.{key}")
        origins[f"{section}.{key}"] = f"{where} with {origin}"
    for section in REQUIRED_SECTIONS:
        if section not in raw:
            raise ConfigError(f"{where}: missing required section [{section}]")
    built = {name: _build_section(name, cls, raw.get(name, {}), where, origins) for name, cls in SECTIONS.items()}
    cfg = Config(**built, source=where)
    _cross_checks(cfg, where)
    return cfg


def _override_items(env: Mapping[str, str], overrides: Mapping[str, str]):
    for name, text in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            section, key = name[len(ENV_PREFIX) :].split("__", 1)
            yield f"environment variable {name}", section.lower(), key.lower(), text
    for dotted, text in overrides.items():
        if "." not in dotted:
            raise ConfigError(f"override `{dotted}`: write it as section.key=value, e.g. train.steps=100")
        section, key = dotted.split(".", 1)
        yield f"override {dotted}", section, key, text


def _unknown(where: str, key: str, valid: list[str], what: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return f"{where}: unknown {what} `{key}`.{hint} Valid {what}s: {', '.join(valid)}"


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(name: str, cls: type, values: dict[str, Any], where: str, origins: Mapping[str, str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types_ = _field_types(cls)
    for key in values:
        if key not in fields:
            raise ConfigError(_unknown(where, f"{name}.{key}", [f"{name}.{k}" for k in fields], "key"))
    kwargs = {}
    for key, f in fields.items():
        if key in values:
            dotted = f"{name}.{key}"
            kwargs[key] = _check_value(values[key], types_[key], f.metadata, origins.get(dotted, where), dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"{where}: missing required key `{name}.{key}` ({f.metadata.get('help', '')}). Add it under [{name}]."
            )
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: [{name}] {e}") from None


def _base_types(ftype: Any) -> tuple[type, ...]:
    if isinstance(ftype, types.UnionType) or typing.get_origin(ftype) is typing.Union:
        return tuple(t for t in typing.get_args(ftype))
    return (ftype,)


def _check_value(value: Any, ftype: Any, meta: Mapping[str, Any], where: str, dotted: str) -> Any:
    allowed = _base_types(ftype)
    if value is None and type(None) in allowed:
        return None
    ok = False
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value, ok = float(value), True
        elif t is int and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        elif t in (str, bool) and isinstance(value, t):
            ok = True
        if ok:
            break
    if not ok:
        names = " or ".join(t.__name__ for t in allowed if t is not type(None))
        raise ConfigError(
            f"{where}: `{dotted}` must be {names}, got {value!r} ({type(value).__name__}). {meta.get('help', '')}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: `{dotted}` = {value!r} must be a finite number. {meta.get('help', '')}")
    problem = field_problem(value, meta)
    if problem:
        raise ConfigError(f"{where}: `{dotted}` = {value!r} {problem}")
    return value


def _parse_text(text: str, ftype: Any, origin: str, dotted: str) -> Any:
    allowed = _base_types(ftype)
    if type(None) in allowed and text.strip().lower() in ("", "none", "null"):
        return None
    for t in allowed:
        try:
            if t is bool:
                low = text.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                continue
            if t is int:
                return int(text.replace("_", ""))
            if t is float:
                return float(text)
            if t is str:
                return text
        except ValueError:
            continue
    names = " or ".join(t.__name__ for t in allowed if t is not type(None))
    raise ConfigError(f"{origin}: `{dotted}` expects {names}, got {text!r}")


def _cross_checks(cfg: Config, where: str) -> None:
    name = cfg.runtime.run_name
    if name in (".", "..") or any(c in name for c in "/\\") or name != name.strip():
        raise ConfigError(
            f"{where}: runtime.run_name = {name!r} names one folder under checkpoint.dir and metrics.dir; "
            "use a plain name without slashes or surrounding spaces, e.g. 'tiny-lr3e-3'"
        )
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"{where}: train.seq_len ({cfg.train.seq_len}) > model.max_seq_len ({cfg.model.max_seq_len}); lower train.seq_len or raise model.max_seq_len"
        )
    if cfg.optim.schedule == "wsd" and cfg.optim.warmup + cfg.optim.warmdown > cfg.train.steps:
        raise ConfigError(
            f"{where}: optim.warmup + optim.warmdown ({cfg.optim.warmup} + {cfg.optim.warmdown}) > train.steps ({cfg.train.steps}); shorten them or raise train.steps"
        )
    if not cfg.data.mixture and cfg.data.source == "files" and not cfg.data.input:
        raise ConfigError(f"{where}: data.source = 'files' needs data.input (a glob of text files)")
    if not cfg.data.mixture and cfg.data.source == "hf" and not cfg.data.dataset:
        raise ConfigError(f"{where}: data.source = 'hf' needs data.dataset (e.g. 'HuggingFaceFW/fineweb-edu')")


def dump_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Minimal TOML writer for flat sections of scalars (what Config holds)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            lines.append(f"{key} = {_toml_scalar(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def describe_keys() -> str:
    """Every section and key with type, default and help (for --help-config)."""
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"[{section}]")
        types_ = _field_types(cls)
        for f in dataclasses.fields(cls):
            default = "required" if f.default is dataclasses.MISSING else repr(f.default)
            extra = ""
            if "choices" in f.metadata:
                extra = f" one of {f.metadata['choices']}"
            elif "range" in f.metadata:
                extra = f" range {f.metadata['range']}"
            tname = getattr(types_[f.name], "__name__", str(types_[f.name]))
            out.append(f"  {f.name:<24} {tname:<6} {default:<22} {f.metadata.get('help', '')}{extra}")
        out.append("")
    return "\n".join(out)
