"""The package graph is a contract: each package may depend only on what sits below it."""

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["kernels", "rdep", "model", "data", "metrics", "train"]
ALLOWED_NMOE = {
    "kernels": set(),
    "rdep": {"kernels"},
    "model": {"kernels", "rdep"},
    "data": set(),
    "metrics": set(),
    "train": {"kernels", "rdep", "model", "data", "metrics"},
}
TORCH_FREE = {"data", "metrics"}
REQUIRED_NMOE = {
    "train": {"kernels", "rdep", "model", "data", "metrics"},
    "rdep": {"kernels"},
    "model": {"kernels", "rdep"},
}


def declared(pkg: str) -> set[str]:
    meta = tomllib.loads((ROOT / "packages" / f"nmoe-{pkg}" / "pyproject.toml").read_text())["project"]
    deps = list(meta.get("dependencies", []))
    return {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower() for d in deps}


def imported(pkg: str) -> dict[str, set[str]]:
    """{top-level module: {files}} for every import in the package's sources (not tests)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "packages" / f"nmoe-{pkg}" / "src").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module == "nmoe":
                    names = [f"nmoe.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                key = ".".join(parts[:2]) if parts[0] == "nmoe" and len(parts) > 1 else parts[0]
                found.setdefault(key, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("pkg", PACKAGES)
def test_declared_nmoe_dependencies(pkg):
    nmoe_deps = {d.removeprefix("nmoe-") for d in declared(pkg) if d.startswith("nmoe-")}
    assert nmoe_deps <= ALLOWED_NMOE[pkg], f"nmoe-{pkg} declares {nmoe_deps - ALLOWED_NMOE[pkg]}, not allowed"
    assert REQUIRED_NMOE.get(pkg, set()) <= nmoe_deps


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_follow_the_graph(pkg):
    imports = imported(pkg)
    for module, files in imports.items():
        if module.startswith("nmoe."):
            other = module.split(".")[1]
            if other != pkg:
                assert other in ALLOWED_NMOE[pkg], f"nmoe-{pkg} imports {module} in {sorted(files)}"
                assert f"nmoe-{other}" in declared(pkg), (
                    f"nmoe-{pkg} imports {module} but does not declare nmoe-{other}"
                )


@pytest.mark.parametrize("pkg", sorted(TORCH_FREE))
def test_data_and_metrics_are_torch_free(pkg):
    imports = imported(pkg)
    for banned in ("torch", "triton"):
        assert banned not in imports, f"nmoe-{pkg} imports {banned} in {sorted(imports[banned])}"
        assert banned not in declared(pkg)


def test_kernels_depend_on_torch_and_triton_only():
    deps = declared("kernels")
    assert {"torch", "triton"} <= deps
    assert not {d for d in deps if d.startswith("nmoe")}
    third_party = {m for m in imported("kernels") if not m.startswith("nmoe")}
    stdlib_ok = {
        "__future__",
        "dataclasses",
        "functools",
        "math",
        "os",
        "typing",
        "warnings",
        "collections",
        "enum",
        "itertools",
        "contextlib",
        "importlib",
        "sys",
        "typing_extensions",
        "abc",
        "threading",
    }
    assert third_party - stdlib_ok <= {"torch", "triton", "numpy"}, third_party - stdlib_ok


def test_no_namespace_init():
    for pkg in PACKAGES:
        assert not (ROOT / "packages" / f"nmoe-{pkg}" / "src" / "nmoe" / "__init__.py").exists(), (
            "nmoe is a PEP 420 namespace"
        )
