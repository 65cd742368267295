"""The dependency rules of the packages, read from the source (imports anywhere in a file).

No import cycle inside node/, workers/ or sr_templates/; node/ never imports workers/ and does
not import torch or transformers at module level; sr_templates/ imports nothing of ours.
``if TYPE_CHECKING:`` imports do not run, so they do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "workers", "sr_templates")


@dataclass(frozen=True)
class ImportEdge:
    source: str  # the importing module
    target: str  # the imported module (ours: the deepest module that exists; else as written)
    line: int
    module_level: bool  # False inside a function or method


def modules_under(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.stmt, bool]]:
    """(import statement, at module level) for every import that runs."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), in_function)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, not in_function
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        yield from _imports(node, inner)


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The deepest existing module of ours along a dotted name, else the name itself."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return name


def import_edges(known: dict[str, Path]) -> list[ImportEdge]:
    edges: list[ImportEdge] = []
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for stmt, module_level in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(stmt, ast.Import):
                targets = [alias.name for alias in stmt.names]
            elif isinstance(stmt, ast.ImportFrom):
                base = stmt.module or ""
                if stmt.level:
                    anchor = module.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - (stmt.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from x import y`: the module x.y when it is one, else x
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in stmt.names
                ]
            for target in targets:
                edges.append(ImportEdge(module, _resolve(target, known), stmt.lineno, module_level))
    return edges


def import_cycles(edges: list[ImportEdge], known: dict[str, Path]) -> list[list[str]]:
    """The strongly connected groups of two or more of our modules (Tarjan), sorted."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for e in edges:
        if e.target in known and e.target != e.source:
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def _describe(group: list[str], edges: list[ImportEdge]) -> str:
    inside = [e for e in edges if e.source in group and e.target in group]
    return "\n".join(f"  {e.source}:{e.line} imports {e.target}" for e in inside)


KNOWN = modules_under(REPO, PACKAGES)
EDGES = import_edges(KNOWN)


def test_no_import_cycles() -> None:
    cycles = import_cycles(EDGES, KNOWN)
    assert not cycles, "import cycles:\n" + "\n\n".join(_describe(g, EDGES) for g in cycles)


def test_node_never_imports_workers() -> None:
    bad = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in EDGES
        if e.source.split(".")[0] == "node" and e.target.split(".")[0] == "workers"
    ]
    assert not bad, "node/ must load worker code by name (importlib), not import it:\n" + "\n".join(
        bad
    )


def test_node_does_not_import_torch_at_module_level() -> None:
    heavy = {"torch", "transformers"}
    bad = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in EDGES
        if e.source.split(".")[0] == "node" and e.module_level and e.target.split(".")[0] in heavy
    ]
    assert not bad, "the node must install and start without torch:\n" + "\n".join(bad)


def test_sr_templates_imports_nothing_of_ours() -> None:
    bad = [
        f"{e.source}:{e.line} imports {e.target}"
        for e in EDGES
        if e.source.split(".")[0] == "sr_templates"
        and e.target.split(".")[0] in ("node", "workers")
    ]
    assert not bad, "sr_templates/ must stand alone:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_and_relative_import_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    known = modules_under(tmp_path, ("pkg",))
    edges = import_edges(known)
    assert import_cycles(edges, known) == [["pkg.a", "pkg.sub.b"]]
    assert not [e for e in edges if e.source == "pkg.c" and e.target == "pkg.a"]
    assert [e.module_level for e in edges if e.source == "pkg.a"] == [False]
