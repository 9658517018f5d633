"""The package's import graph: no cycles, and nothing imports the faces (``cli``, ``studio``) from below.

Static (ast) so it needs no optional packages: every ``import``/``from ... import`` of an ``egolcd`` module,
module-level and inside functions (lazy), except those under ``if TYPE_CHECKING``. Importing a submodule
runs its parent package's ``__init__`` too; that implicit edge is not counted (every module would sit in
a cycle with ``egolcd/__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "egolcd"
FACES = ("egolcd.cli", "egolcd.studio")
# Known lazy cycles still to remove. Keep this empty.
ALLOWED_LAZY_CYCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path], lazy: bool) -> set[str]:
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not lazy:
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in mods else target)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in mods and m != name}


def _graph(lazy: bool) -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods, lazy) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def _face(name: str) -> str | None:
    return next((f for f in FACES if name == f or name.startswith(f + ".")), None)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle_at_module_level():
    assert _cycles(_graph(lazy=False)) == []


def test_no_import_cycle_with_lazy_imports():
    cycles = _cycles(_graph(lazy=True))
    assert [c for c in cycles if c not in ALLOWED_LAZY_CYCLES] == []


def test_only_faces_import_faces_and_not_each_other():
    """``cli`` may start the studio; nothing below imports a face, and the studio does not import ``cli``."""
    wrong = []
    for name, targets in _graph(lazy=True).items():
        for target in targets:
            face = _face(target)
            if face is None or face == _face(name) or name == "egolcd.__main__":
                continue
            if not (name == "egolcd.cli" and face == "egolcd.studio"):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_errors_is_bottom_floor():
    assert _graph(lazy=True)["egolcd.errors"] == set()
