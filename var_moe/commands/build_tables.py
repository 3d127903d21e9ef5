"""`varmoe build-tables`: verified per-layer VAR tables from calibration statistics, for one model.

    varmoe build-tables --routing-stats calib.parquet --preset balanced --output tables.safetensors

Writes the safetensors file and its JSON metadata beside it, and prints the table size of every
layer. The model is loaded to check the statistics fit it and to fingerprint its routers.
Test: `pytest tests/test_var_eval.py`.
"""

from __future__ import annotations

import argparse

from ..errors import InvalidInputError


def register(sub: argparse._SubParsersAction) -> None:
    from ..var.setup import add_var_flags
    from ._common import add_model_flags

    p = sub.add_parser("build-tables", help="Phase 2: build verified VAR tables from calibration statistics")
    add_model_flags(p)
    add_var_flags(p)
    p.add_argument("--output", "-o", required=True, help="tables file (.safetensors); metadata goes to .json beside it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapters import get_adapter
    from ..loading import load_model
    from ..var.setup import config_from_args
    from ..var.tables import VARTables
    from ._common import load_spec

    if not args.routing_stats:
        raise InvalidInputError("--routing-stats is required (Phase 1 statistics of the calibration split)")
    config = config_from_args(args)
    model, _ = load_model(load_spec(args))
    tables = VARTables.from_stats_file(args.routing_stats, model, get_adapter(model), config)
    path = tables.save(args.output)
    sizes = tables.sizes()
    print(f"wrote {path} (+ {path.with_suffix('.json').name}): entries per layer {sizes}, total {sum(sizes.values())}")
    return 0
