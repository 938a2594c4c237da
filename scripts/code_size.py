"""Print the product code's size: each module's lines (as `wc -l` counts them) and docstring's first sentence,
the total, and what breaks the size rules (a module over 300 lines, a function over 50 but the schema's).

Run from the project root: `python scripts/code_size.py [--markdown]`. Exits 1 when a rule is broken, so
a reviewer sees at once whether a change kept the product small."""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_LINES = 300
FUNCTION_LINES = 50
EXEMPT_FUNCTIONS = {("predict.py", "run")}  # the published schema, one Input(...) per input


def product_files() -> list[Path]:
    return [ROOT / "predict.py", *sorted(ROOT.glob("flux_day/*.py")), *sorted(ROOT.glob("flux_day/*/*.py"))]


def long_functions(path: Path, tree: ast.Module) -> list[str]:
    rel = str(path.relative_to(ROOT))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > FUNCTION_LINES and (rel, node.name) not in EXEMPT_FUNCTIONS:
                found.append(f"{rel}:{node.lineno} {node.name}() is {length} lines (most {FUNCTION_LINES})")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the module list as a markdown table")
    args = parser.parse_args()
    total, problems, rows = 0, [], []
    for path in product_files():
        source = path.read_text()
        lines = len(source.splitlines())
        total += lines
        tree = ast.parse(source)
        paragraph = " ".join((ast.get_docstring(tree) or "(no docstring)").split("\n\n")[0].split())
        rel = str(path.relative_to(ROOT))
        rows.append((rel, lines, re.split(r"(?<=[.!?])\s", paragraph)[0]))
        if lines > MODULE_LINES:
            problems.append(f"{rel} is {lines} lines (most {MODULE_LINES})")
        problems += long_functions(path, tree)
    if args.markdown:
        print("| module | lines | what it holds |\n| --- | ---: | --- |")
        for rel, lines, doc in rows:
            print(f"| `{rel}` | {lines} | {doc} |")
    else:
        for rel, lines, doc in rows:
            print(f"{lines:5d}  {rel:38s} {doc[:90]}")
    print(f"{total:5d}  total in {len(rows)} modules")
    for problem in problems:
        print(f"too long: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
