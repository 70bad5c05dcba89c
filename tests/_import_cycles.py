"""Counts the import cycles among condfx's modules: ``python -m tests._import_cycles [--list]``.

Two graphs, both read statically by grimp (the library under import-linter):

- all imports: every import statement, lazy ones inside functions included;
- import time: only the imports that run when a module is imported (module level, outside
  ``if TYPE_CHECKING``).

Both add the package ``__init__`` each import runs first (importing ``condfx.passes._insert`` runs
``condfx/passes/__init__.py``), which is how a cycle through a package bites (``import
condfx.kv_calibrate`` failed so). Imports made through ``importlib`` are not seen.

A cycle is an elementary circuit of the graph (each module at most once); the count covers
circuits of up to 15 modules. ``lint-imports`` (the acyclic_siblings contract) is what CI checks;
this prints the figure for notes and reviews.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

import grimp

Graph = dict[str, set[str]]
_MAX_LENGTH = 15


def _module_level_lines(path: str) -> set[int]:
    lines: set[int] = set()

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                lines.add(node.lineno)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body + node.orelse + node.finalbody)
                for handler in node.handlers:
                    walk(handler.body)

    walk(ast.parse(Path(path).read_text()).body)
    return lines


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graphs(package: str = "condfx") -> tuple[Graph, Graph]:
    """Returns ``(all imports, import-time imports)`` as ``{importer: {imported}}``."""
    g = grimp.build_graph(package, cache_dir=None)
    everything: Graph = {m: set() for m in g.modules}
    at_import: Graph = {m: set() for m in g.modules}
    for module in g.modules:
        top = _module_level_lines(importlib.util.find_spec(module).origin)
        own = {*_ancestors(module), module}
        for target in g.find_modules_directly_imported_by(module):
            runs = {m for m in (*_ancestors(target), target) if m not in own}
            everything[module] |= runs
            details = g.get_import_details(importer=module, imported=target)
            if any(d["line_number"] in top for d in details):
                at_import[module] |= runs
    return everything, at_import


def cycles(graph: Graph) -> list[tuple[str, ...]]:
    """Elementary circuits of up to ``_MAX_LENGTH`` modules, each listed once (from its least node)."""
    found = []
    for start in sorted(graph):
        stack = [(start, (start,))]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(path)
                elif nxt > start and nxt not in path and len(path) < _MAX_LENGTH:
                    stack.append((nxt, (*path, nxt)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every cycle")
    args = parser.parse_args()
    for name, graph in zip(("all imports", "import time"), import_graphs(), strict=True):
        found = cycles(graph)
        print(f"{name}: {len(found)} cycles")
        for cycle in found if args.list else ():
            print("   ", " -> ".join((*cycle, cycle[0])))


if __name__ == "__main__":
    main()
