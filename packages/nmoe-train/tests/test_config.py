"""The config system: typed sections, actionable errors, env overrides, a stable fingerprint."""

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe.train.config import ConfigError, build_config, load_config

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "configs").rglob("*.toml"))

MINIMAL = """
[model]
vocab_size = 256
dim = 64
n_layers = 2
n_heads = 4
inter_dim = 128
n_routed_experts = 4
moe_inter_dim = 32
top_k = 2

[data]
name = "d"
input = "x/*.txt"
tokenizer = "tok.json"

[train]
steps = 10
seq_len = 32
global_batch_size = 2

[optim]
lr = 1e-3
"""


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    assert len(CONFIGS) >= 7
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    for required in [
        "tiny.toml",
        "moonlet.toml",
        "moonlight.toml",
        "speedrun/small_dense_sdpa.toml",
        "speedrun/small_moe.toml",
        "speedrun/small_moe_ultra.toml",
        "speedrun/super.toml",
    ]:
        assert required in names
    for path in CONFIGS:
        cfg = load_config(path, env={})
        assert len(cfg.fingerprint) == 64


def test_shipped_shapes():
    moonlet = load_config(ROOT / "configs/moonlet.toml", env={}).model
    assert (moonlet.n_routed_experts, moonlet.top_k) == (64, 6)
    ml = load_config(ROOT / "configs/moonlight.toml", env={}).model
    assert (
        ml.dim,
        ml.n_layers,
        ml.n_dense_layers,
        ml.n_routed_experts,
        ml.n_shared_experts,
        ml.moe_inter_dim,
        ml.top_k,
        ml.attn,
    ) == (2048, 27, 1, 64, 2, 1408, 6, "mla")


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = write(tmp_path, MINIMAL.replace("steps = 10", "stesp = 10\nsteps = 10"))
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    msg = str(e.value)
    assert str(path) in msg and "train.stesp" in msg and "Did you mean `train.steps`" in msg


def test_unknown_section(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[optimizer]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section `optimizer`.*Did you mean `optim`"):
        load_config(path, env={})


def test_wrong_type_names_expected_type(tmp_path):
    path = write(tmp_path, MINIMAL.replace("steps = 10", 'steps = "ten"'))
    with pytest.raises(ConfigError, match=r"`train.steps` must be int, got 'ten'"):
        load_config(path, env={})


def test_bool_is_not_an_int(tmp_path):
    path = write(tmp_path, MINIMAL.replace("global_batch_size = 2", "global_batch_size = true"))
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        load_config(path, env={})


def test_out_of_range_names_the_range(tmp_path):
    path = write(tmp_path, MINIMAL.replace("lr = 1e-3", "lr = -1.0"))
    with pytest.raises(ConfigError, match=r"`optim.lr` = -1.0 is out of range; allowed range is \[0.0, 10.0\]"):
        load_config(path, env={})


def test_bad_choice_lists_choices(tmp_path):
    path = write(tmp_path, MINIMAL + '\n[runtime]\ndevice = "tpu"\n')
    with pytest.raises(ConfigError, match=r"choose one of 'auto', 'cpu', 'cuda'"):
        load_config(path, env={})


def test_missing_required_key(tmp_path):
    path = write(tmp_path, MINIMAL.replace("seq_len = 32\n", ""))
    with pytest.raises(ConfigError, match=r"missing required key `train.seq_len`"):
        load_config(path, env={})


def test_missing_required_section(tmp_path):
    text = MINIMAL.split("[optim]")[0]
    with pytest.raises(ConfigError, match=r"missing required section \[optim\]"):
        load_config(write(tmp_path, text), env={})


def test_model_cross_field_error_names_keys(tmp_path):
    path = write(tmp_path, MINIMAL.replace("top_k = 2", "top_k = 8"))
    with pytest.raises(ConfigError, match=r"top_k \(8\) > n_routed_experts \(4\)"):
        load_config(path, env={})


def test_env_override_is_typed(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(
        path,
        env={
            "NMOE_TRAIN__STEPS": "100",
            "NMOE_RUNTIME__COMPILE": "true",
            "NMOE_OPTIM__LR": "2e-4",
            "NMOE_MODEL__HEAD_DIM": "none",
            "OTHER": "x",
        },
    )
    assert cfg.train.steps == 100 and cfg.runtime.compile is True and cfg.optim.lr == 2e-4
    assert cfg.model.head_dim is None


def test_env_override_errors(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"NMOE_TRAIN__STEPS.*expects int, got 'lots'"):
        load_config(path, env={"NMOE_TRAIN__STEPS": "lots"})
    with pytest.raises(ConfigError, match=r"unknown key `train.stepz`.*Did you mean `train.steps`"):
        load_config(path, env={"NMOE_TRAIN__STEPZ": "3"})
    with pytest.raises(
        ConfigError, match=r"c.toml with environment variable NMOE_TRAIN__STEPS: `train.steps` = 0 is out of range"
    ):
        load_config(path, env={"NMOE_TRAIN__STEPS": "0"})


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_in_toml_and_overrides(tmp_path, text):
    with (
        pytest.raises(ConfigError, match=r"c.toml: `optim.lr` = nan must be a finite number")
        if text == "nan"
        else pytest.raises(ConfigError, match=r"`optim.lr` = -?inf must be a finite number")
    ):
        load_config(write(tmp_path, MINIMAL.replace("lr = 1e-3", f"lr = {text}")), env={})
    with pytest.raises(
        ConfigError, match=r"c.toml with override eval.target_loss: `eval.target_loss` = .* must be a finite number"
    ):
        load_config(write(tmp_path, MINIMAL), env={}, overrides={"eval.target_loss": text})


@pytest.mark.parametrize("name", ["a/b", "..", "x\\y", " padded"])
def test_run_name_must_be_one_folder_name(tmp_path, name):
    with pytest.raises(ConfigError, match=r"runtime.run_name .* without slashes"):
        load_config(write(tmp_path, MINIMAL), env={}, overrides={"runtime.run_name": name})


def test_cli_style_overrides_win_over_env(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), env={"NMOE_TRAIN__STEPS": "5"}, overrides={"train.steps": "7"})
    assert cfg.train.steps == 7


def test_fingerprint_ignores_formatting_order_and_defaults(tmp_path):
    a = load_config(write(tmp_path, MINIMAL, "a.toml"), env={})
    reordered = "\n".join(reversed(MINIMAL.strip().split("\n\n"))) + "\n# a comment\n"
    b = load_config(write(tmp_path, reordered, "b.toml"), env={})
    explicit = MINIMAL.replace("lr = 1e-3", "lr = 0.001\nbeta1 = 0.9")
    c = load_config(write(tmp_path, explicit, "c.toml"), env={})
    assert a.fingerprint == b.fingerprint == c.fingerprint


def test_fingerprint_ignores_operational_keys_only(tmp_path):
    base = load_config(write(tmp_path, MINIMAL), env={})
    operational = load_config(
        write(tmp_path, MINIMAL), env={"NMOE_CHECKPOINT__DIR": "/elsewhere", "NMOE_TRAIN__LOG_EVERY": "1"}
    )
    changed = load_config(write(tmp_path, MINIMAL), env={"NMOE_OPTIM__LR": "2e-3"})
    assert operational.fingerprint == base.fingerprint
    assert changed.fingerprint != base.fingerprint


def test_resolved_toml_round_trips(tmp_path):
    for path in CONFIGS:
        cfg = load_config(path, env={})
        again = build_config(tomllib.loads(cfg.to_toml()), "roundtrip", env={})
        assert again.fingerprint == cfg.fingerprint
        assert again.to_dict() == cfg.to_dict()


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 10**6), lr=st.floats(1e-6, 1.0), seed=st.integers(0, 2**40))
def test_fingerprint_is_a_function_of_the_values(steps, lr, seed):
    raw = tomllib.loads(MINIMAL)
    raw["train"].update(steps=steps, seed=seed)
    raw["optim"].update(lr=lr, warmup=0)
    a = build_config(raw, "a", env={})
    b = build_config(tomllib.loads(a.to_toml()), "b", env={})
    assert a.fingerprint == b.fingerprint
    raw["train"]["seed"] = seed + 1
    assert build_config(raw, "c", env={}).fingerprint != a.fingerprint
