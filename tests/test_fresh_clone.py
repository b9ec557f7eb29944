"""A fresh clone runs the README's main command with nothing beside it (no ../shared, no prepared data).

The clone is of the committed HEAD: in CI the checkout is a clean clone, so HEAD is the tree under test;
locally, commit first.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN_COMMAND = ["run", "nmoe-train", "configs/tiny.toml"]  # README quick start: `uv run nmoe-train configs/tiny.toml`


def _uv() -> str:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` sets UV to its own executable
    assert uv, "uv not found: run the tests with `uv run pytest` (uv is nmoe's only prerequisite)"
    return uv


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fresh_clone_runs_the_main_command(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    clone = tmp_path / "nmoe"  # tmp_path holds nothing else: no ../shared beside the clone
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", head.stdout.strip()], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nmoe"]
    assert "../shared" not in (clone / "configs" / "tiny.toml").read_text()

    # The uv cache stays shared (UV_CACHE_DIR is inherited), so the sync links packages instead of downloading.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    uv = _uv()
    subprocess.run([uv, "sync", "--locked", "--quiet"], cwd=clone, env=env, check=True, timeout=1200)
    proc = subprocess.run([uv, *MAIN_COMMAND], cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"\[nmoe\] completed: run \S+, step 200, val loss \d", out), out[-4000:]
    assert "../shared" not in out and "shared/corpus" not in out, "the run referred to ../shared"
    assert (clone / "data" / "python-docs-4k" / "manifest.json").is_file()
