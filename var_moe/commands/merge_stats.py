"""`varmoe merge-stats a.parquet b.parquet ... -o all.parquet`: exact merge of capture shards.

Parses flags and calls `var_moe.capture.merge.merge_files`. Test: `pytest tests/test_capture_merge.py`.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-stats", help="merge statistics files of several capture shards exactly")
    p.add_argument("inputs", nargs="+", help="statistics Parquet files (their .pairs.parquet sidecars are merged too)")
    p.add_argument("--output", "-o", required=True, help="merged statistics file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..capture.merge import merge_files

    out = merge_files(args.inputs, args.output)
    print(f"wrote {out}")
    return 0
