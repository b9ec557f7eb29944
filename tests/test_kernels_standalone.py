"""`pip install nmoe-kernels` alone must work and pull in no other nmoe package."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kernels_installs_alone(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH (CI installs it); this test builds a fresh venv with it")
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env)
    py = venv / "bin" / "python"
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(py), str(ROOT / "packages" / "nmoe-kernels")],
        check=True,
        env=env,
        timeout=1200,
    )
    listing = subprocess.run(
        [uv, "pip", "list", "--python", str(py), "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    names = {p["name"].lower() for p in json.loads(listing)}
    assert "nmoe-kernels" in names
    assert not {n for n in names if n.startswith("nmoe") and n != "nmoe-kernels"}, names
    out = subprocess.run(
        [str(py), "-c", "import nmoe.kernels as k; print(k.grouped_mm.__name__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert "grouped_mm" in out
