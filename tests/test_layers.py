"""The package's shape: layers that import downward only, no import circles, no function-local import of
ftwt's own modules (the way circles used to hide) outside the CLI layer, and files of one idea (at most
400 lines).

    core, base (errors, console)  →  models  →  algorithms  →  io, engine  →  workflows  →  cli

Each module's imports are read from its source (``ast``), so the test sees every arrow, including
imports inside functions and under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ftwt_cli"

#: Layer of a module (by the first part of its name inside ftwt_cli) and its floor; a module may import
#: its own layer and layers on lower floors only. Layers that share a floor never import each other.
LAYERS = {
    "errors": ("base", 0),
    "console": ("base", 0),
    "core": ("core", 0),
    "models": ("models", 1),
    "algorithms": ("algorithms", 2),
    "io": ("io", 3),
    "engine": ("engine", 3),
    "workflows": ("workflows", 4),
    "cli": ("cli", 5),
    "__main__": ("entry", 6),
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) == 1:
        return ("base", 0)  # the package itself: its version
    return LAYERS[parts[1]]


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported ftwt_cli module, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.startswith("ftwt_cli"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("ftwt_cli"):
                for alias in child.names:  # `from ftwt_cli.io import loading` imports a module
                    candidate = f"{child.module}.{alias.name}"
                    found.append((candidate if candidate in MODULES else child.module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


EDGES = {name: imports_of(path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert all(layer_of(name) for name in MODULES)
    assert {name.split(".")[1] for name in MODULES if "." in name} <= set(LAYERS) | {"profiles"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    layer, floor = layer_of(name)
    for target, line, _ in EDGES[name]:
        other, other_floor = layer_of(target)
        where = f"{MODULES[name].name}:{line} imports {target}"
        assert other == layer or other_floor < floor, f"{where}: {layer} (floor {floor}) may not import {other} (floor {other_floor})"
        if layer == "core":
            assert other == "core", f"{where}: the core imports torch (and itself) only"


#: Where function-local imports are allowed: each CLI command imports its workflow when it runs, so that
#: `ftwt --help` and `ftwt --version` load neither torch nor pandas. They still point down
#: (test_imports_point_down reads them too); elsewhere a local import is a circle in hiding.
LAZY_LAYERS = {"cli"}


@pytest.mark.parametrize("name", [n for n in sorted(MODULES) if layer_of(n)[0] not in LAZY_LAYERS])
def test_no_function_local_import_of_ftwt(name):
    local = [(target, line) for target, line, in_function in EDGES[name] if in_function]
    assert not local, f"{MODULES[name]}: function-local imports of ftwt modules {local} (import at the top; a circle is a design problem)"


def test_no_import_circles():
    graph = {name: sorted({t for t, _, _ in EDGES[name] if t in MODULES and t != name}) for name in MODULES}
    # A package's __init__ that re-exports its submodules is not a circle with them: leave those arrows out.
    graph = {n: [t for t in ts if not t.startswith(n + ".")] for n, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " → ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            walk(name)


def test_files_hold_one_idea():
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_test_sees_an_upward_arrow(tmp_path):
    """The parser finds a function-local upward import (the pattern the layers rule out)."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from ftwt_cli.workflows import train\n    return train\n")
    assert imports_of(source) == [("ftwt_cli.workflows.train", 2, True)]


def test_the_cli_layer_still_has_lazy_imports_that_point_down():
    """The exemption is used (the commands import their workflows lazily) and those arrows are checked."""
    local = [(n, t) for n, edges in EDGES.items() if layer_of(n)[0] == "cli" for t, _, inner in edges if inner]
    assert any(t.startswith("ftwt_cli.workflows") for _, t in local)
    assert all(layer_of(t)[1] <= layer_of(n)[1] for n, t in local)
