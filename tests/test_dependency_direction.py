"""The package graph is a contract: each package may depend only on what sits below it."""

import ast
import re
import sys
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


KERNELS_OPTIONAL = {
    "quack": {"_quack_gemm.py", "_quack_epilogue.py"}
}  # the third, _quack_fast_accum, needs none  # import -> the only modules that may use it


def test_kernels_depend_on_torch_and_triton_only():
    """torch and triton (and numpy) are nmoe-kernels' dependencies; quack, its optional `quack` extra, is imported only
    by the two modules that wrap it, and those only when the fp8 layer asks for it (no import at package import)."""
    deps = declared("kernels")
    assert {"torch", "triton"} <= deps
    assert not {d for d in deps if d.startswith("nmoe")}
    imports = imported("kernels")
    third_party = {m for m in imports if not m.startswith("nmoe")} - set(sys.stdlib_module_names)
    assert third_party <= {"torch", "triton", "numpy", *KERNELS_OPTIONAL}, third_party
    meta = tomllib.loads((ROOT / "packages" / "nmoe-kernels" / "pyproject.toml").read_text())["project"]
    extra = {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0] for d in meta["optional-dependencies"]["quack"]}
    assert "quack-kernels" in extra and "quack-kernels" not in deps
    for module, users in KERNELS_OPTIONAL.items():
        assert {Path(f).name for f in imports.get(module, set())} <= users
    src = ROOT / "packages" / "nmoe-kernels" / "src" / "nmoe" / "kernels"
    for path in src.glob("*.py"):  # module-level imports of the wrappers would import quack with the package
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nmoe.kernels"):
                assert "_quack_epilogue" not in (node.module, *(a.name for a in node.names)), path.name
    for node in ast.parse((src / "_quack_gemm.py").read_text()).body:  # quack itself: imported inside load() only
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not any(n.split(".")[0] == "quack" for n in names), "_quack_gemm imports quack at module level"


def test_no_namespace_init():
    for pkg in PACKAGES:
        assert not (ROOT / "packages" / f"nmoe-{pkg}" / "src" / "nmoe" / "__init__.py").exists(), (
            "nmoe is a PEP 420 namespace"
        )


def package_modules(pkg: str) -> dict[str, Path]:
    """{dotted module name: file} of one package's sources; a package's __init__.py is the package name."""
    src = ROOT / "packages" / f"nmoe-{pkg}" / "src"
    modules = {}
    for path in src.rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _import_targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may load: `from a import b` may load a.b (a module) or just a."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{a.name}" for a in node.names] + [base]


def import_graph(pkg: str) -> dict[str, set[str]]:
    """{module: modules of the same package it imports}, imports inside functions included.

    Each import maps to the deepest module of the package that it names (`from nmoe.data.x import f` -> nmoe.data.x,
    `from nmoe.data import x` -> nmoe.data.x when x is a module, else the package's __init__).
    """
    modules = package_modules(pkg)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = _import_targets(node, module, is_package)
            if isinstance(node, ast.ImportFrom):
                named = [t for t in targets[:-1] if t in modules]
                targets = named if len(named) == len(targets) - 1 else named + [targets[-1]]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None when the graph is a DAG."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_import_cycle_inside_a_package(pkg):
    cycle = find_cycle(import_graph(pkg))
    assert cycle is None, f"nmoe-{pkg} has an import cycle (function-level imports included): {' -> '.join(cycle)}"


def test_cycle_finder_reports_the_cycle_and_maps_imports(tmp_path, monkeypatch):
    pkg_dir = tmp_path / "packages" / "nmoe-fake" / "src" / "nmoe" / "fake"
    (pkg_dir / "sub").mkdir(parents=True)
    (pkg_dir / "__init__.py").write_text("from nmoe.fake.a import f\n")
    (pkg_dir / "a.py").write_text("import os\nfrom nmoe.fake import b\n\ndef f():\n    pass\n")
    (pkg_dir / "b.py").write_text("def g():\n    from .sub.c import h\n")
    (pkg_dir / "sub" / "__init__.py").write_text("")
    (pkg_dir / "sub" / "c.py").write_text("def h():\n    from ..a import f\n    import nmoe.fake.sub\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    graph = import_graph("fake")
    assert graph == {
        "nmoe.fake": {"nmoe.fake.a"},
        "nmoe.fake.a": {"nmoe.fake.b"},
        "nmoe.fake.b": {"nmoe.fake.sub.c"},
        "nmoe.fake.sub": set(),
        "nmoe.fake.sub.c": {"nmoe.fake.a", "nmoe.fake.sub"},
    }
    assert find_cycle(graph) == ["nmoe.fake.a", "nmoe.fake.b", "nmoe.fake.sub.c", "nmoe.fake.a"]
    (pkg_dir / "sub" / "c.py").write_text("def h():\n    from nmoe.fake import a\n")
    assert find_cycle(import_graph("fake")) == ["nmoe.fake.a", "nmoe.fake.b", "nmoe.fake.sub.c", "nmoe.fake.a"]
    (pkg_dir / "sub" / "c.py").write_text("def h():\n    import os\n")
    assert find_cycle(import_graph("fake")) is None
