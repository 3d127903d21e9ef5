"""`varmoe plot`: the Phase 1 figures (PNG and PDF) from a statistics file and a held-out JSON.

    varmoe plot --input stats.parquet --output-dir figures/ [--heldout heldout.json]

Library: `var_moe.validation.figures` (one function per figure). Test: `pytest tests/test_validation_cli.py`.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="Phase 1 figures (PNG + PDF) from a statistics file")
    p.add_argument("--input", required=True, help="statistics Parquet file from `varmoe capture`")
    p.add_argument("--output-dir", required=True, help="folder for the figures")
    p.add_argument("--heldout", default=None, help="held-out predictability JSON from `varmoe predictability`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..capture.schema import read_stats
    from ..validation.figures import plot_all
    from .validate import load_heldout

    heldout = load_heldout(args.heldout)
    df, meta = read_stats(args.input)
    paths = plot_all(df, meta, args.output_dir, heldout)
    print(f"{len(paths)} files written to {args.output_dir}")
    return 0
