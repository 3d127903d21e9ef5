"""`varmoe build-tables`: held-out-certified per-layer VAR tables from a calibration capture, for one model.

    varmoe build-tables --routing-stats calib.parquet --preset balanced --output tables.safetensors \
        [--evidence evidence.safetensors] [--target-agreement 0.9 --entropy-threshold none ...] \
        [--choose-evidence train_evidence.safetensors --choose-split train --choose-max-docs 600]

The capture's metadata names its documents; a routing pass over them collects evidence by document
(or `--evidence` reuses/saves it), each entry's set is chosen on even documents and certified on odd
ones (`var_moe.var.tables`); with `--choose-evidence` the sets are chosen on another split's
documents (default train) and certified on every calibration document. Statistics or evidence of
the test split are refused unless --allow-test-split.
Writes the safetensors file and its JSON metadata beside it, and prints the table size of every
layer. Test: `pytest tests/test_var_eval.py tests/test_var_verification.py tests/test_var_choosing.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidInputError


def register(sub: argparse._SubParsersAction) -> None:
    from ._common import add_model_flags
    from ._var import add_choose_flags, add_var_flags

    p = sub.add_parser("build-tables", help="Phase 2: build held-out-certified VAR tables from calibration statistics",
                       description="Choose each token's expert set on half of the calibration documents (or on "
                       "--choose-evidence), certify it on the other half (on every calibration document), and write "
                       "the tables the router serves.")
    add_model_flags(p)
    add_var_flags(p, with_tables=False)
    p.add_argument("--output", "-o", required=True, help="tables file (.safetensors); metadata goes to .json beside it")
    p.add_argument("--evidence", default=None,
                   help="evidence file (.safetensors): read if it exists, else collected and written there")
    add_choose_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapters import get_adapter
    from ..loading import load_model
    from ..var.evidence import Evidence
    from ..var.stats_io import read_stats
    from ..var.stats_io import check_split
    from ..var.tables import VARTables, evidence_for_stats
    from ._common import load_spec
    from ._var import check_choose_flags, choose_evidence_from_args, config_from_args

    if not args.routing_stats:
        raise InvalidInputError("--routing-stats is required (Phase 1 statistics of the calibration split)")
    config = config_from_args(args)
    _, meta = read_stats(args.routing_stats)
    check_split(meta, args.routing_stats, config.allow_test_split)  # before loading anything heavy
    check_choose_flags(args, meta, config.allow_test_split)
    model, tokenizer = load_model(load_spec(args))
    adapter = get_adapter(model)
    chooser = choose_evidence_from_args(args, meta, model, adapter, tokenizer)
    evidence = None
    if args.evidence and Path(args.evidence).exists():
        evidence = Evidence.load(args.evidence)
    elif args.evidence:
        evidence = evidence_for_stats(meta, model, adapter, tokenizer)
        evidence.save(args.evidence)
    tables = VARTables.from_stats_file(args.routing_stats, model, adapter, config, tokenizer=tokenizer,
                                       evidence=evidence, allow_test_split=config.allow_test_split,
                                       choose_evidence=chooser, choose_source=args.choose_evidence or "")
    path = tables.save(args.output)
    sizes = tables.sizes()
    v = tables.metadata["verification"]
    print(f"wrote {path} (+ {path.with_suffix('.json').name}): entries per layer {sizes}, total {sum(sizes.values())} "
          f"({v['accepted']} of {v['candidates']} candidates certified, {v['multiplicity']}; {v['method']})")
    if tables.pair_tier:
        print(f"(previous, token) entries per layer {tables.pair_sizes()} ({v['pair_accepted']} of {v['pair_candidates']} "
              f"pair candidates certified in the same family; without a token entry for their token: "
              f"{v['pair_entries_without_token_entry']})")
    return 0
