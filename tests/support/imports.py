"""The package's import graph, read from its source (ast): which dense_rl modules each module imports, at
module level and inside functions, and which top-level packages (ray, diffusers, ...) it imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dense_rl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> tuple[set[str], set[str], set[str]]:
    """(module-level, inside-a-function) dense_rl modules that `path` imports, and every top-level
    package name it imports anywhere."""
    top, nested, packages = set(), set(), set()

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            found = []
            if isinstance(child, ast.Import):
                found = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from dense_rl.x import y` imports the module dense_rl.x.y when there is one.
                found = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in known else child.module
                         for a in child.names]
            packages.update(name.split(".")[0] for name in found)
            (nested if inside else top).update(name for name in found if name in known)
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return top, nested, packages


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
    """{module: dense_rl modules imported at module level}, {module: ... inside functions},
    {module: top-level package names imported anywhere}."""
    files = modules()
    found = {name: _imports(path, set(files)) for name, path in files.items()}
    return ({name: top for name, (top, _, _) in found.items()}, {name: nested for name, (_, nested, _) in found.items()},
            {name: packages for name, (_, _, packages) in found.items()})


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the graph as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def walk(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := walk(target)):
                return found
        state[name] = "done"
        stack.pop()
        return None

    for name in sorted(graph):
        if name not in state and (found := walk(name)):
            return found
    return None
