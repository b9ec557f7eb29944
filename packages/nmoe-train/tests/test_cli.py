"""The nmoe-train CLI: dry runs for every config, clear errors instead of tracebacks."""

import subprocess
import sys
from pathlib import Path

import pytest

from nmoe.train.cli import main

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted((ROOT / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_dry_run_prints_summary_for_every_config(path, capsys):
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for needle in ("fingerprint", "total params", "active params / token", "train FLOPs / token", "memory: total"):
        assert needle in out, needle


def test_config_typo_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        (ROOT / "configs" / "tiny.toml").read_text().replace("global_batch_size = 16", "global_batch_sise = 16")
    )
    assert main([str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown key `train.global_batch_sise`" in err and "Did you mean `train.global_batch_size`" in err


def test_set_override_and_help_config(capsys):
    assert main([str(ROOT / "configs" / "tiny.toml"), "--dry-run", "--set", "train.steps=700"]) == 0
    assert "over 700 steps" in capsys.readouterr().out
    assert main(["--help-config"]) == 0
    assert "[model]" in capsys.readouterr().out


def test_unreachable_source_prints_the_prep_command(tmp_path, make_config, text_corpus):
    cfg = tmp_path / "hf.toml"
    cfg.write_text(
        make_config(tmp_path, text_corpus, data={"source": "hf", "dataset": "nmoe-test/not-a-dataset", "input": ""})
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "nmoe.train.cli", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "uv run nmoe-data prep --source hf --dataset nmoe-test/not-a-dataset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file(capsys):
    assert main(["does/not/exist.toml"]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_missing_tokenizer_without_vocab_size_names_the_config_keys(tmp_path, make_config, text_corpus, capsys):
    cfg = tmp_path / "notok.toml"
    text = make_config(tmp_path, text_corpus, data={"tokenizer": str(tmp_path / "missing.json")})
    cfg.write_text("\n".join(line for line in text.splitlines() if not line.startswith("tokenizer_vocab_size")))
    assert main([str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "data.tokenizer = " in err and "missing.json' does not exist and data.tokenizer_vocab_size is not set" in err
    assert "--set data.tokenizer_vocab_size=" in err
    assert not any((tmp_path / "data").iterdir())  # checked writable up front, nothing prepared
