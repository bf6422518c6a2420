"""The wheel users install: every package and the YAML configs are in it; the layers stay apart."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("annotation", "reward", "ppo", "dpo")
LAYERS = ("align", *STAGES)


def test_every_package_is_listed_for_the_wheel():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")  # tomli: the dev extra, 3.10
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for layer in LAYERS for p in (REPO / layer).rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
    assert setuptools["package-dir"]["align.configs"] == "configs"
    assert (REPO / "configs" / "demo" / "reward.yaml").exists() and (REPO / "configs" / "demo" / "ppo.yaml").exists()


def _imports(path: Path) -> set[str]:
    """Every module an align module imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules() -> dict[str, Path]:
    modules = {}
    for layer in (*LAYERS, "bench"):
        for path in (REPO / layer).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    return {m: {o for name in _imports(p) if (o := owner(name)) and o != m} for m, p in modules.items()}


def test_the_ground_of_align_imports_no_stage():
    roof = ("align.commands", "align.__main__")
    for module, deps in _graph().items():
        if module.startswith("align") and not module.startswith(roof):
            above = sorted(d for d in deps if d.split(".")[0] in STAGES or d.startswith(roof))
            assert not above, f"{module} (ground) imports {above}"


def test_no_training_stage_imports_the_annotation_app():
    for module, deps in _graph().items():
        if module.split(".")[0] in ("reward", "ppo", "dpo"):
            app = sorted(d for d in deps if d.split(".")[0] == "annotation")
            assert not app, f"{module} imports the annotation app: {app}"


def test_no_import_cycle_and_nothing_imports_the_tests():
    graph = _graph()
    for module, path in _modules().items():
        assert not any(name.split(".")[0] == "tests" for name in _imports(path)), f"{module} imports tests"
        # the graph follows absolute imports: a relative one could hide an edge
        relative = [n.lineno for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                    if isinstance(n, ast.ImportFrom) and n.level > 0]
        assert not relative, f"{module} imports relatively at lines {relative}"
    # depth-first search for a back edge
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [module, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[module] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in _modules().values()
            if p.parts[len(REPO.parts)] in LAYERS and (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"
