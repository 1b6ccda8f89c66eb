"""How readable the code base is, in numbers: the longest function and class of each module.

    python -m tools.code_shape            # resdiff/*.py and the CLIs, as a Markdown table
    python -m tools.code_shape --over 60 8   # every function over 60 lines or 8 parameters

Issue #14 asks for these figures before and after the design step; a long function or class is where
a reader has to hold the most in mind at once. Lines are counted from the definition to its last line,
docstring and comments included.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def longest(tree: ast.AST, kind: type | tuple[type, ...]) -> tuple[str, int]:
    """The name and line count of the longest node of ``kind`` anywhere in ``tree`` (methods as Class.name)."""
    best = ("-", 0)

    def visit(node: ast.AST, prefix: str) -> None:
        nonlocal best
        for child in ast.iter_child_nodes(node):
            name = getattr(child, "name", None)
            if isinstance(child, kind):
                size = child.end_lineno - child.lineno + 1
                if size > best[1]:
                    best = (prefix + name, size)
            visit(child, prefix + name + "." if name else prefix)

    visit(tree, "")
    return best


def shape(files: list[Path]) -> list[dict]:
    rows = []
    for file in files:
        tree = ast.parse(file.read_text())
        fn = longest(tree, (ast.FunctionDef, ast.AsyncFunctionDef))
        cls = longest(tree, ast.ClassDef)
        rows.append(dict(module=str(file.relative_to(ROOT)), lines=len(file.read_text().splitlines()),
                         function=fn[0], function_lines=fn[1], cls=cls[0], class_lines=cls[1]))
    return rows


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """How many parameters a caller can pass: positional and keyword ones, not ``self``/``cls``, ``*args`` or
    ``**kwargs``."""
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def offenders(files: list[Path], max_lines: int, max_params: int) -> list[tuple[str, int, int]]:
    """(module:Class.function, lines, parameters) of every function longer than ``max_lines`` or taking more than
    ``max_params`` parameters, longest first."""
    found = []

    def visit(node: ast.AST, prefix: str, module: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = getattr(child, "name", None)
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size, count = child.end_lineno - child.lineno + 1, parameters(child)
                if size > max_lines or count > max_params:
                    found.append((f"{module}:{prefix}{name}", size, count))
            visit(child, prefix + name + "." if name else prefix, module)

    for file in files:
        visit(ast.parse(file.read_text()), "", str(file.relative_to(ROOT)))
    return sorted(found, key=lambda f: -f[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--over", type=int, nargs=2, metavar=("LINES", "PARAMS"),
                   help="instead: every function longer than LINES lines or with more than PARAMS parameters")
    args = p.parse_args()
    files = sorted((ROOT / "resdiff").glob("*.py")) + sorted(ROOT.glob("*.py"))
    if args.over:
        print("| function | lines | parameters |")
        print("| --- | ---: | ---: |")
        for name, size, count in offenders(files, *args.over):
            print(f"| {name} | {size} | {count} |")
        return
    print("| module | lines | longest function | lines | longest class | lines |")
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for r in shape(files):
        print(f"| {r['module']} | {r['lines']} | {r['function']} | {r['function_lines']} | {r['cls']} | {r['class_lines']} |")


if __name__ == "__main__":
    main()
