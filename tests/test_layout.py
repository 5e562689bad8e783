"""The package's shape, measured from its source with ast: imports run one way (no
cycle, function-level imports included), a lazy import of raiox's own code is rare
and says why, and no module outgrows ~800 lines."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import raiox_cli

PACKAGE = Path(raiox_cli.__file__).parent
MAX_LINES = 800
# Modules allowed past MAX_LINES, each with the reason it is still one module.
LONG_MODULES: dict[str, str] = {}
MAX_LAZY_IMPORTS = 35  # issue 25: about 30, each there for start-up time
LAZY_REASONS = ("lazy", "start-up", "slow", "optional")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the raiox module it imports
    line: int
    in_function: bool
    reason: str | None  # the comment on the import's line or the line above it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _comment(lines: list[str], line: int) -> str | None:
    """The reason given for an import: a comment on its line, or in the block of
    imports and comments right above it (one comment may explain a few imports)."""
    at = line - 1
    while at >= 0:
        text = lines[at].strip()
        if "#" in text:
            return text.split("#", 1)[1].strip()
        if at < line - 1 and text and not text.startswith(("import ", "from ")):
            return None
        at -= 1
    return None


def _imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    found = []
    pending: list[tuple[ast.AST, bool]] = [(ast.parse(source), False)]
    while pending:
        node, in_function = pending.pop()
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            pending.append((child, nested))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package
                    for _ in range(child.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = f"{parent}.{base}" if base else parent
                targets = [f"{base}.{alias.name}" for alias in child.names]
            for target in {resolve(t) for t in targets if t.split(".")[0] == "raiox_cli"}:
                if target and target != name:
                    reason = _comment(lines, child.lineno)
                    found.append(Import(name, target, child.lineno, nested, reason))
    return found


def imports() -> list[Import]:
    """Every import of a raiox module, at any depth (functions, TYPE_CHECKING blocks):
    `from a import b` counts as importing a.b when that is a module, else a."""
    known = modules()
    return [i for name, path in known.items() for i in _imports_of(name, path, known)]


def cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_function_level_imports_and_cycles() -> None:
    """The measuring code itself: a cycle through a function-level import is found."""
    assert cycles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [["a", "b", "c"]]
    assert cycles([("a", "b"), ("b", "c")]) == []
    found = imports()
    assert any(i.in_function for i in found) and any(not i.in_function for i in found)
    assert ("raiox_cli.search.query", "raiox_cli.search.result") in {
        (i.module, i.target) for i in found
    }


def test_no_import_cycles_counting_function_level_imports() -> None:
    found = cycles([(i.module, i.target) for i in imports()])
    assert found == [], f"import cycles (move what both need below them): {found}"


def test_lazy_imports_of_raiox_are_few_and_say_why() -> None:
    lazy = [i for i in imports() if i.in_function]
    silent = [
        f"{i.module}:{i.line} -> {i.target}"
        for i in lazy
        if not (i.reason and any(word in i.reason for word in LAZY_REASONS))
    ]
    assert silent == [], "a function-level import says why, e.g. '# lazy: start-up time'"
    statements = sorted({(i.module, i.line) for i in lazy})
    assert len(statements) <= MAX_LAZY_IMPORTS, statements


def test_no_module_over_800_lines() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_MODULES
    }
    assert long == {}, f"split these by concern (STYLE.md 15): {long}"
