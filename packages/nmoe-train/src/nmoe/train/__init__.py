"""nmoe.train: config system, training loop, checkpoints and the `nmoe-train` CLI."""

from nmoe.train.config import Config, ConfigError, build_config, load_config

__all__ = ["Config", "ConfigError", "build_config", "load_config"]
