"""The import graph of resdiff/: which module imports which, lazy (in-function) imports included, and its circles.

    python -m tools.import_graph          # one line per module: what it imports from resdiff; then the circles

Read from the source with ast, nothing is imported. tests/test_layout.py holds the rules it must keep: no
circles, and unet.py imports nothing of resdiff but its layers (nn.py).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "resdiff"


def imports_of(path: Path, package: str = "resdiff") -> set[str]:
    """The modules of ``package`` that ``path`` imports anywhere in its code (``from .x import``, ``from . import x``,
    ``import resdiff.x``), by module name without the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == package:
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith(package + "."))
    modules = {p.stem for p in path.parent.glob("*.py")}
    return {m for m in found if m in modules and m != path.stem}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``__init__`` included as a module of its own)."""
    return {p.stem: imports_of(p, package.name) for p in sorted(package.glob("*.py"))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import one another, directly or through others (Tarjan's strongly
    connected components of more than one module, or a module importing itself)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    graph = import_graph()
    for module, deps in graph.items():
        print(f"{module:>14} -> {', '.join(sorted(deps)) or '-'}")
    found = cycles(graph)
    print("circles: " + ("; ".join(" <-> ".join(c) for c in found) if found else "none"))


if __name__ == "__main__":
    main()
