"""Model shapes come from the shipped TOML configs (the single source of truth), read here directly:
nmoe-model cannot depend on nmoe-train's config loader, and only the [model] section matters."""

import tomllib
from pathlib import Path

import pytest

from nmoe.model import ModelConfig

CONFIG_ROOT = Path(__file__).resolve().parents[3] / "configs"
CONFIG_NAMES = sorted(p.relative_to(CONFIG_ROOT).with_suffix("").as_posix() for p in CONFIG_ROOT.rglob("*.toml"))


def load_shape(name: str) -> ModelConfig:
    """ModelConfig of configs/{name}.toml."""
    with open(CONFIG_ROOT / f"{name}.toml", "rb") as f:
        return ModelConfig(**tomllib.load(f)["model"])


@pytest.fixture(scope="session")
def shapes() -> dict[str, ModelConfig]:
    """{config name: ModelConfig} for every file in configs/, e.g. shapes['moonlet'], shapes['speedrun/small_moe']."""
    return {name: load_shape(name) for name in CONFIG_NAMES}


def pytest_generate_tests(metafunc):
    if "config_name" in metafunc.fixturenames:
        metafunc.parametrize("config_name", CONFIG_NAMES)
