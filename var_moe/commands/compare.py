"""`varmoe compare baseline.json var.json`: the seed's comparison block from two evaluate outputs.

    varmoe compare results/phase2/baseline.json results/phase2/var_balanced.json [--json out.json]

Speedup = the paired ratio measured inside the VAR run; the ratio of separate runs is shown as a
secondary line. `varmoe evaluate --compare A B` does the same. Exit status 0 whatever the verdict. Test: `pytest tests/test_var_eval.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="Phase 2: compare a baseline and a VAR evaluation (seed format)")
    p.add_argument("baseline", help="output of `varmoe evaluate --mode baseline`")
    p.add_argument("var", help="output of `varmoe evaluate --mode var`")
    p.add_argument("--json", default=None, help="also write the comparison as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return print_comparison(args.baseline, args.var, args.json)


def print_comparison(baseline: str, var: str, json_out: str | None) -> int:
    """Shared with `varmoe evaluate --compare A B` (the seed's spelling)."""
    from ..var.compare import compare_files

    text, data = compare_files(baseline, var)
    print(text)
    if json_out:
        Path(json_out).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0
