"""From command-line choices to a `VARConfig` and tables: preset, config file, overrides, stats.

Shared by `varmoe evaluate` and `varmoe build-tables` so both read the same flags the same way.
Order: preset (default balanced) -> `--config cfg.json` (replaces the preset) -> explicit flags.
Test: `pytest tests/test_var_eval.py`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InvalidInputError
from .config import VARConfig, get_preset


def add_var_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routing-stats", "--routing_stats", dest="routing_stats", default=None,
                   help="Phase 1 statistics of the calibration split (Parquet) to build tables from")
    p.add_argument("--tables", default=None, help="prebuilt tables file (from `varmoe build-tables`) instead of --routing-stats")
    p.add_argument("--preset", default="balanced", choices=["conservative", "balanced", "aggressive"])
    p.add_argument("--config", default=None, help="VARConfig JSON file (replaces the preset)")
    p.add_argument("--adaptive-k", dest="adaptive_k", action="store_true", default=None, help="one expert for dominant verified tokens")
    p.add_argument("--adaptive-k-min-weight", dest="adaptive_k_min_weight", type=float, default=None)
    p.add_argument("--weights-source", dest="weights_source", choices=["table", "learned"], default=None)
    p.add_argument("--shadow-rate", dest="shadow_rate", type=float, default=None)
    p.add_argument("--shadow-min-checks", dest="shadow_min_checks", type=int, default=None,
                   help="shadow checks of a token before its served agreement alone can demote it (0 = off)")
    p.add_argument("--cache-ttl-steps", dest="cache_ttl_steps", type=int, default=None)
    p.add_argument("--no-cache", dest="no_cache", action="store_true", help="turn the cached tier off")
    p.add_argument("--no-fast-path", dest="no_fast_path", action="store_true", help="turn the fast tier off")


def config_from_args(args: argparse.Namespace, for_evaluation: bool = False) -> VARConfig:
    cfg = VARConfig.from_json(args.config) if args.config else get_preset(args.preset)
    changes: dict[str, Any] = {}
    for name in ("adaptive_k", "adaptive_k_min_weight", "weights_source", "shadow_rate", "shadow_min_checks",
                 "cache_ttl_steps"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    if getattr(args, "no_cache", False):
        changes["enable_cache"] = False
    if getattr(args, "no_fast_path", False):
        changes["enable_fast_path"] = False
    if getattr(args, "routing_stats", None):
        changes["routing_stats_path"] = str(args.routing_stats)
    if for_evaluation:
        # wall-clock TTLs make results depend on machine speed: evaluations count forward steps
        changes["cache_ttl_seconds"] = None
        changes.setdefault("cache_ttl_steps", cfg.cache_ttl_steps or 1000)
    return cfg.replace(**changes)


def tables_from_args(args: argparse.Namespace, model: Any, config: VARConfig) -> Any:
    from ..adapters import get_adapter
    from .tables import VARTables

    adapter = get_adapter(model)
    if getattr(args, "tables", None):
        return VARTables.load(args.tables, model, adapter)
    if not config.routing_stats_path:
        raise InvalidInputError("--routing-stats (calibration statistics) or --tables is required for --mode var")
    return VARTables.from_stats_file(config.routing_stats_path, model, adapter, config)
