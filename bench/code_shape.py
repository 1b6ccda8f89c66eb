"""How readable the code base is, in numbers: the longest function and class of each module.

    python bench/code_shape.py            # resdiff/*.py and the CLIs, as a Markdown table

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


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    files = sorted((ROOT / "resdiff").glob("*.py")) + sorted(ROOT.glob("*.py"))
    print("| module | lines | longest function | lines | longest class | lines |")
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for r in shape(files):
        print(f"| {r['module']} | {r['lines']} | {r['function']} | {r['function_lines']} | {r['cls']} | {r['class_lines']} |")


if __name__ == "__main__":
    main()
