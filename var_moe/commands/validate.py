"""`varmoe validate`: the Phase 1 hypothesis report from a statistics Parquet file.

    varmoe validate --input stats.parquet --output report.txt [--json report.json] [--heldout heldout.json]

Reads the file with `var_moe.capture.schema.read_stats`, builds the report (`var_moe.validation.report`)
and writes it as text (and JSON). Exit status 0 whether the criteria pass or fail: a negative
result is a result. Test: `pytest tests/test_validation_cli.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InvalidInputError
from ..validation.config import ValidationConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("validate", help="hypothesis report (Zipf, Spearman + CIs, entropy, coverage, criteria)")
    p.add_argument("--input", required=True, help="statistics Parquet file from `varmoe capture`")
    p.add_argument("--output", required=True, help="text report path")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--heldout", default=None, help="held-out predictability JSON from `varmoe predictability`")
    d = ValidationConfig()
    p.add_argument("--min-frequency", type=int, default=d.fast_path_min_frequency, help="fast-path frequency floor")
    p.add_argument("--max-entropy", type=float, default=d.fast_path_max_entropy, help="fast-path mean entropy bound (nats)")
    p.add_argument("--min-consistency", type=float, default=d.fast_path_min_consistency,
                   help="consistency bound of the consistency-based fast path")
    p.add_argument("--equal-n", type=int, default=d.equal_n, help="sample size for the equal-n top-1 entropy")
    p.add_argument("--top-n", type=int, default=d.top_n_consistency, help="N of the top-N consistency criterion")
    p.add_argument("--n-boot", type=int, default=d.n_boot, help="bootstrap resamples for the Spearman CIs")
    p.add_argument("--seed", type=int, default=d.seed, help="bootstrap seed")
    p.set_defaults(func=run)


def load_heldout(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--heldout: no such file {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--heldout: {p} is not JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or "rows" not in data:
        raise InvalidInputError(f"--heldout: {p} is not a held-out predictability file (no 'rows')")
    return data


def run(args: argparse.Namespace) -> int:
    from ..capture.schema import read_stats
    from ..validation.render import render_text
    from ..validation.report import build_report

    cfg = ValidationConfig(fast_path_min_frequency=args.min_frequency, fast_path_max_entropy=args.max_entropy,
                           fast_path_min_consistency=args.min_consistency, equal_n=args.equal_n,
                           top_n_consistency=args.top_n, n_boot=args.n_boot, seed=args.seed)
    heldout = load_heldout(args.heldout)
    df, meta = read_stats(args.input)
    rep = build_report(df, meta, cfg, heldout)
    rep["input"] = str(args.input)
    text = render_text(rep)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1, sort_keys=False))
    for c in rep["criteria"]:
        print(f"[{'PASS' if c['pass'] else 'FAIL'}] {c['name']}: {c['measured']} ({c['op']} {c['target']})")
    print(f"report: {out}" + (f", {args.json}" if args.json else ""))
    return 0
