"""`varmoe prepare-datasets --dataset c4 wikitext ... --output-dir DIR [--num-docs N] [--split S]`.

The seed's `scripts/prepare_datasets.py`: samples of C4, WikiText, SlimPajama (or any hub dataset,
a local file or folder, `stdlib`) written as local files, one folder per dataset
(`DIR/<name>/data.jsonl` + `manifest.json`), so runs repeat offline with `--dataset DIR/<name>`;
each document keeps its original id and so its split. Parses flags and calls
`var_moe.dataset_files`. Test: `pytest tests/test_hub_datasets.py`.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ..corpus import SPLITS

    p = sub.add_parser("prepare-datasets", help="store samples of datasets as local files for offline runs")
    p.add_argument("--dataset", nargs="+", required=True,
                   help="c4 | wikitext | slimpajama | hub id | local .txt/.jsonl/.parquet file or folder | stdlib")
    p.add_argument("--output-dir", required=True, help="one sub-folder per dataset is written here")
    p.add_argument("--num-docs", type=int, default=1000, help="documents per dataset (0 = all; streams stop here)")
    p.add_argument("--split", default=None, choices=SPLITS, help="only this split (default: documents of every split)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..dataset_files import folder_name, prepare_dataset

    names = [folder_name(d) for d in args.dataset]
    if len(set(names)) != len(names):
        from ..errors import InvalidInputError

        raise InvalidInputError(f"--dataset values share a folder name ({', '.join(names)}); prepare them one at a time")
    for dataset, name in zip(args.dataset, names):
        out = Path(args.output_dir) / name
        result = prepare_dataset(dataset, out, args.num_docs or None, args.split)
        print(f"{dataset}: {result.documents} documents, {result.characters:,} characters -> {out} "
              f"(use --dataset {out})")
    return 0
