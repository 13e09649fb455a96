"""The layering the project is built on: imports run one way, no circles, small documented functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gpp_onnx", "vta_backend", "gpp_app")
# What each layer may import from the project (the core sees nothing above it).
ALLOWED = {
    "gpp_onnx": {"gpp_onnx"},
    "vta_backend": {"gpp_onnx", "vta_backend"},
    "gpp_app": {"gpp_onnx", "vta_backend", "gpp_app"},
}
# Third-party packages only the application layer may import.
APP_ONLY = {"torch", "onnx2torch", "matplotlib", "typer", "rich", "PIL"}
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    """Every module of the three packages by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path, name: str) -> set[str]:
    """Dotted names a module imports (at any depth: lazy imports count too)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


MODULES = modules()
GRAPH = {
    name: {target for target in imported(path, name) if target in MODULES and target != name}
    for name, path in MODULES.items()
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_one_way(name):
    layer = name.split(".")[0]
    imports = imported(MODULES[name], name)
    wrong = sorted(i for i in imports if i.split(".")[0] in PACKAGES and i.split(".")[0] not in ALLOWED[layer])
    assert not wrong, f"{name} ({layer}) must not import {wrong}"
    if layer != "gpp_app":
        heavy = sorted(i for i in imports if i.split(".")[0] in APP_ONLY)
        assert not heavy, f"{name}: only the application layer imports {heavy}"


def test_no_import_circles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target] if target in path else [name, target]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def definitions():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield name, node


def test_functions_are_short():
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, node in definitions()
        if not isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _public_top_level():
    """Public functions and classes, and the public methods of public classes (an override of a
    method of a base class in the same module shares the base's docstring)."""
    for name, path in MODULES.items():
        body = ast.parse(path.read_text()).body
        classes = {node.name: node for node in body if isinstance(node, ast.ClassDef)}
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                yield name, node
            if isinstance(node, ast.ClassDef):
                inherited = {
                    item.name
                    for base in node.bases
                    if isinstance(base, ast.Name) and base.id in classes
                    for item in ast.walk(classes[base.id])
                    if isinstance(item, ast.FunctionDef)
                }
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                        if item.name not in inherited and not node.name.startswith("_"):
                            yield f"{name}.{node.name}", item


def test_public_classes_and_functions_have_docstrings():
    missing = [f"{name}.{node.name}" for name, node in _public_top_level() if ast.get_docstring(node) is None]
    assert not missing, f"public definitions without a docstring: {missing}"
