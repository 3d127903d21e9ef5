"""The one entry point of the benchmarks: `python -m benchmarks NAME [flags]` runs
`benchmarks/NAME.py`'s `main(argv)` with the flags; without a name it lists every benchmark with
the first line of its docstring. Every benchmark takes `--output PATH` for its JSON.
Test: `pytest tests/test_benchmarks_runner.py`.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmarks() -> dict[str, str]:
    """name -> first docstring line, for every module here that defines `main` (read, not imported)."""
    out = {}
    for path in sorted(HERE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            out[path.stem] = (ast.get_docstring(tree) or "").splitlines()[0] if ast.get_docstring(tree) else ""
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = benchmarks()
    if not argv or argv[0] in ("-h", "--help", "list"):
        print("usage: python -m benchmarks NAME [flags]   (NAME --help for a benchmark's flags)\n")
        width = max(map(len, known))
        for name, line in known.items():
            print(f"  {name:<{width}}  {line}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in known:
        close = [k for k in known if name in k or k in name]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        print(f"python -m benchmarks: unknown benchmark {name!r}{hint} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    result = importlib.import_module(f"benchmarks.{name}").main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
