"""The largest classes and functions of the installed package, by lines (a refactoring's before and after).

``python -m benchmarks.code_sizes [--root DIR] [--top 5] [--out outputs/code_sizes.json]``: counts every
class and every function or method (nested ones included) in the installed package's folders under
``--root`` (default: this checkout), from its first decorator to its last line.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

PACKAGE_DIRS = ("bac", "configs", "policies", "envs", "runtime", "eval", "apps")


def sizes(root: Path) -> tuple[list[dict], list[dict]]:
    """Every class and every function under ``root``'s package folders: file:line, name, lines (methods for classes)."""
    classes, functions = [], []
    for folder in PACKAGE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                entry = {"where": f"{path.relative_to(root)}:{first}", "name": node.name,
                         "lines": node.end_lineno - first + 1}
                if isinstance(node, ast.ClassDef):
                    entry["methods"] = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)
                    classes.append(entry)
                else:
                    functions.append(entry)
    key = lambda e: -e["lines"]  # noqa: E731
    return sorted(classes, key=key), sorted(functions, key=key)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("outputs/code_sizes.json"))
    args = parser.parse_args(argv)
    classes, functions = sizes(args.root)
    result = {"root": str(args.root), "classes": classes[:args.top], "functions": functions[:args.top]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for kind in ("classes", "functions"):
        print(kind)
        for e in result[kind]:
            extra = f", {e['methods']} methods" if "methods" in e else ""
            print(f"  {e['lines']:>4} lines{extra}  {e['name']}  {e['where']}")
    return result


if __name__ == "__main__":
    main()
