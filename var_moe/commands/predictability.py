"""`varmoe predictability`: held-out routing predictability, trained model beside a random-init control.

    varmoe predictability --model models/reference-moe --num-samples 200 --max-length 256 \
        --output heldout.json --control random-init

Tables (token, (previous, token), most frequent set) are built by the one tables module
(`var_moe.var.tables`, sets chosen on every calibration sequence) in one pass over the calibration
split and scored against the LRU baselines in one pass over the test split; with
`--control random-init` the same is done for the same architecture with seeded random weights.
Test sequences keep their document, so every figure gets a 95% interval from resampling test
documents (`--resamples`); the per-document counts are written on one line at the end of the JSON.
Library: `var_moe.validation.predictability`. Test: `pytest tests/test_validation_cli.py`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import InvalidInputError
from ._common import add_dataset_flags, add_model_flags, load_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predictability", help="held-out routing predictability (calibration -> test) with a control")
    add_model_flags(p)
    add_dataset_flags(p, default_split="test")
    p.add_argument("--calibration-split", default="calibration", help="split the tables are built on")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="sequences for the calibration pass (default: --num-samples)")
    p.add_argument("--output", required=True, help="JSON output path")
    p.add_argument("--control", default="random-init", choices=["random-init", "none"],
                   help="score a seeded random-init model of the same config too (default)")
    p.add_argument("--control-seed", type=int, default=0)
    p.add_argument("--min-pair-count", type=int, default=2,
                   help="calibration occurrences a (previous, token) pair needs to be used")
    p.add_argument("--resamples", type=int, default=2000,
                   help="bootstrap resamples of test documents for the 95%% intervals (default 2000)")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.set_defaults(func=run)


def dump_report(result: dict) -> str:
    """Indented JSON, except the bulky per-document counts, which go compact on the last line."""
    head = {k: v for k, v in result.items() if k != "per_document"}
    text = json.dumps(head, indent=1)
    if "per_document" not in result:
        return text
    return text[:-2] + ',\n "per_document": ' + json.dumps(result["per_document"], separators=(",", ":")) + "\n}"


def run(args: argparse.Namespace) -> int:
    from ..corpus import SPLITS, iter_batches
    from ..loading import load_model
    from ..validation.predictability import PredictabilityConfig, heldout_predictability
    from ..validation.render import heldout_margin_table
    from ..var.evaluate import eval_batches

    if args.calibration_split not in SPLITS:
        raise InvalidInputError(f"--calibration-split must be one of {', '.join(SPLITS)}, got {args.calibration_split!r}")
    if args.calibration_split == args.split:
        raise InvalidInputError("--calibration-split and --split are the same: tables would be scored on their own data")
    for flag, v in (("--num-samples", args.num_samples), ("--calibration-samples", args.calibration_samples)):
        if v is not None and v < 1:
            raise InvalidInputError(f"{flag} must be at least 1")
    config = PredictabilityConfig(min_pair_count=args.min_pair_count, control_seed=args.control_seed,
                                  resamples=args.resamples, bootstrap_seed=args.bootstrap_seed)
    model, tok = load_model(load_spec(args))
    cal_n = args.calibration_samples or args.num_samples

    def batches(split: str, n: int | None) -> list:
        # materialised once: the same batches feed the trained model and the control
        return list(iter_batches(tok, args.dataset, split, args.max_length, args.batch_size, n))

    t0 = time.perf_counter()
    calib = batches(args.calibration_split, cal_n)
    # the same sequences as iter_batches (whole documents cut to --max-length), with their documents
    test = eval_batches(tok, args.dataset, args.split, args.num_samples, args.max_length, args.batch_size,
                        max_per_doc=None)
    if not calib or not test:
        raise InvalidInputError(f"--dataset {args.dataset}: the calibration or test split produced no sequences")
    info = {"model": str(args.model), "dataset": args.dataset, "calibration_split": args.calibration_split,
            "test_split": args.split, "num_samples_calibration": sum(len(b[0]) for b in calib),
            "num_samples_test": sum(len(b.doc_B) for b in test), "max_length": args.max_length}
    result = heldout_predictability(model, calib, test, config, control=args.control, info=info)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_report(result))
    print(heldout_margin_table(result, "exact"))
    print(f"exact top-k set match per layer, trained / control (margin); {result['num_tokens_test']} test tokens; written to {out}")
    return 0
