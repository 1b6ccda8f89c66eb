"""The import graph of resdiff/: which module imports which, lazy (in-function) imports included, and its circles.

    python -m tools.import_graph          # one line per module: what it imports from resdiff; then the circles
    python -m tools.import_graph --picture docs/design/import-graph.png   # the same graph, drawn in layers

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


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """module -> its layer: 0 for a module importing none of the package, else one above the highest it imports
    (a circle, which tests/test_layout.py forbids, is cut where it closes)."""
    found: dict[str, int] = {}

    def layer(v: str, seen: frozenset) -> int:
        if v not in found:
            below = [layer(w, seen | {v}) for w in graph.get(v, ()) if w not in seen and w != v]
            found[v] = 1 + max(below, default=-1)
        return found[v]

    for v in graph:
        layer(v, frozenset())
    return found


def draw(graph: dict[str, set[str]], path: Path, title: str) -> None:
    """The graph as a picture: each layer a row (the bottom row imports nothing of the package), an arrowless line
    from each module down to each module it imports."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from resdiff.charts import save

    level = layers(graph)
    rows: dict[int, list[str]] = {}
    for module in sorted(graph, key=lambda m: (level[m], m)):
        rows.setdefault(level[module], []).append(module)
    widest = max(len(r) for r in rows.values())
    where = {m: ((i + 0.5) * widest / len(row), lvl) for lvl, row in rows.items() for i, m in enumerate(row)}
    fig = Figure(figsize=(max(8.0, widest * 1.15), 1.1 * len(rows) + 1), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for module, deps in graph.items():
        for dep in deps:
            (x0, y0), (x1, y1) = where[module], where[dep]
            ax.plot([x0, x1], [y0, y1], color="0.6", linewidth=0.5, alpha=0.6, zorder=1)
    for module, (x, y) in where.items():
        ax.text(x, y, module, ha="center", va="center", fontsize=7, zorder=2,
                bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.3", "linewidth": 0.6})
    edges = sum(len(d) for d in graph.values())
    ax.set_title(f"{title}: {len(graph)} modules, {edges} imports, {len(rows)} layers (bottom: imports nothing)")
    ax.set_xlim(-0.2, widest + 0.2)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.axis("off")
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", type=Path, default=PACKAGE, help="the package folder to read (default: resdiff/)")
    p.add_argument("--picture", type=Path, help="also draw the graph into this PNG")
    args = p.parse_args()
    graph = import_graph(args.package)
    if args.picture:
        draw(graph, args.picture, f"imports within {args.package.name}/")
        print(f"wrote {args.picture}")
    for module, deps in graph.items():
        print(f"{module:>14} -> {', '.join(sorted(deps)) or '-'}")
    found = cycles(graph)
    print("circles: " + ("; ".join(" <-> ".join(c) for c in found) if found else "none"))


if __name__ == "__main__":
    main()
