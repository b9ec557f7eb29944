"""The corpus shipped in the repo (corpus/python-docs.jsonl.gz) is what corpus/README.md says it is."""

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "corpus" / "python-docs.jsonl.gz"
SHARED = ROOT.parent / "shared" / "corpus" / "docs.jsonl.gz"
SHA256 = "9656397a322db9a983996a71b9ecc505e0bb5eb6ffc6a9a66c920eea29f1a35d"


def test_the_corpus_is_the_python_documentation_under_the_psf_license():
    raw = CORPUS.read_bytes()
    assert len(raw) < 5 << 20, "keep the shipped corpus a few MB"
    assert raw[:4] == b"\x1f\x8b\x08\x00" and raw[4:8] == b"\0\0\0\0", "gzip without a file name, mtime 0"
    records = [json.loads(line) for line in gzip.decompress(raw).splitlines()]
    assert len(records) == 495
    assert all(set(r) == {"id", "source", "text"} and r["source"] == "python3.11-doc" for r in records)
    assert all(len(r["text"]) >= 200 and r["id"].startswith("usr/share/doc/python3.11/html/_sources/") for r in records)
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    license_text = (ROOT / "corpus" / "LICENSE").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in license_text
    assert SHA256 in (ROOT / "corpus" / "README.md").read_text()


@pytest.mark.skipif(
    not SHARED.is_file(), reason=f"the development corpus is not at {SHARED} (../shared beside the repo)"
)
def test_build_sh_rebuilds_the_same_bytes_from_the_shared_corpus(tmp_path):
    shutil.copy(ROOT / "corpus" / "build.sh", tmp_path / "build.sh")
    subprocess.run(["bash", str(tmp_path / "build.sh"), str(SHARED)], check=True, capture_output=True)
    assert (tmp_path / "python-docs.jsonl.gz").read_bytes() == CORPUS.read_bytes()
