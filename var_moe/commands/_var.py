"""The VAR flags shared by `varmoe evaluate`, `build-tables` and `sweep`, and what they build
(a config, tables, the separate choosing evidence of `--choose-evidence`).

Order: preset (default balanced) -> `--config cfg.json` (replaces the preset) -> explicit flags.
Not a subcommand (no `register`). Test: `pytest tests/test_var_eval.py`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import InvalidInputError
from ..var.config import MULTIPLICITY, PRESETS, VARConfig, get_preset


def add_var_flags(p: argparse.ArgumentParser, with_tables: bool = True) -> None:
    p.add_argument("--routing-stats", "--routing_stats", dest="routing_stats", default=None,
                   help="Phase 1 statistics of the calibration split (Parquet) to build tables from")
    if with_tables:
        p.add_argument("--tables", default=None, help="prebuilt tables file (from `varmoe build-tables`) instead of --routing-stats")
    p.add_argument("--preset", default="balanced", choices=list(PRESETS), help="starting VARConfig (default balanced)")
    p.add_argument("--config", default=None, help="VARConfig JSON file (replaces the preset)")
    p.add_argument("--target-agreement", dest="target_agreement", type=float, default=None,
                   help="held-out agreement every served entry must be certified at (0-1]")
    p.add_argument("--frequency-threshold", dest="frequency_threshold", type=int, default=None,
                   help="minimum occurrences of a token on the choosing half of the calibration documents")
    p.add_argument("--entropy-threshold", dest="entropy_threshold", default=None,
                   help="maximum mean routing entropy (share of ln E), or 'none' for no cap")
    p.add_argument("--max-per-document", dest="max_per_document", default=None,
                   help="certifying occurrences one document may contribute, or 'none' for all")
    p.add_argument("--multiplicity", choices=list(MULTIPLICITY), default=None,
                   help="correction over all entries: bh (expected share of wrong entries), holm (any wrong entry), none")
    p.add_argument("--pair-entries", dest="pair_entries", action="store_true", default=None,
                   help="also certify (previous token, token) entries, served where the token has no entry (on in "
                   "the presets)")
    p.add_argument("--no-pair-entries", dest="pair_entries", action="store_false",
                   help="token entries only (an --entropy-threshold implies it unless --pair-entries is given)")
    p.add_argument("--min-pair-count", dest="min_pair_count", type=int, default=None,
                   help="minimum occurrences of a (previous, token) pair on the choosing side (default: --frequency-threshold)")
    p.add_argument("--allow-test-split", dest="allow_test_split", action="store_true",
                   help="build tables from statistics of the test split (refused otherwise: the evaluation scores it)")
    p.add_argument("--adaptive-k", dest="adaptive_k", action="store_true", default=None, help="one expert for dominant verified tokens")
    p.add_argument("--adaptive-k-min-weight", dest="adaptive_k_min_weight", type=float, default=None,
                   help="table weight share of the top expert needed for one expert (with --adaptive-k)")
    p.add_argument("--weights-source", dest="weights_source", choices=["table", "learned"], default=None,
                   help="weights of table rows: stored (table) or the learned router's restricted to the set")
    p.add_argument("--shadow-rate", dest="shadow_rate", type=float, default=None,
                   help="share of table decisions re-checked by the learned router (0-1)")
    p.add_argument("--shadow-min-checks", dest="shadow_min_checks", type=int, default=None,
                   help="shadow checks of a token before its served agreement alone can demote it (0 = off)")
    p.add_argument("--no-fast-path", dest="no_fast_path", action="store_true", help="turn the fast tier off")


def config_from_args(args: argparse.Namespace) -> VARConfig:
    cfg = VARConfig.from_json(args.config) if args.config else get_preset(args.preset)
    changes: dict[str, Any] = {}
    for name in ("adaptive_k", "adaptive_k_min_weight", "weights_source", "shadow_rate", "shadow_min_checks",
                 "target_agreement", "frequency_threshold", "multiplicity", "pair_entries",
                 "min_pair_count"):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    for name, flag in (("entropy_threshold", "--entropy-threshold"), ("max_per_document", "--max-per-document")):
        raw = getattr(args, name, None)
        if raw is not None:
            changes[name] = _none_or(raw, float if name == "entropy_threshold" else int, flag)
    if changes.get("entropy_threshold") is not None and "pair_entries" not in changes:
        changes["pair_entries"] = False  # pair entries have no entropy of their own (var/pairs.py)
    if getattr(args, "allow_test_split", False):
        changes["allow_test_split"] = True
    if getattr(args, "no_fast_path", False):
        changes["enable_fast_path"] = False
    if getattr(args, "routing_stats", None):
        changes["routing_stats_path"] = str(args.routing_stats)
    return cfg.replace(**changes)


def _none_or(raw: str, kind: type, flag: str) -> Any:
    if str(raw).lower() == "none":
        return None
    try:
        return kind(raw)
    except ValueError:
        raise InvalidInputError(f"{flag} must be a number or 'none', got {raw!r}") from None


def tables_from_args(args: argparse.Namespace, model: Any, config: VARConfig, tokenizer: Any = None) -> Any:
    from ..adapters import get_adapter
    from ..var.tables import VARTables

    adapter = get_adapter(model)
    if getattr(args, "tables", None):
        return VARTables.load(args.tables, model, adapter)
    if not config.routing_stats_path:
        raise InvalidInputError("--routing-stats (calibration statistics) or --tables is required for --mode var")
    return VARTables.from_stats_file(config.routing_stats_path, model, adapter, config, tokenizer=tokenizer,
                                     allow_test_split=config.allow_test_split)


def add_choose_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the separate choosing evidence (build-tables, sweep)."""
    p.add_argument("--choose-evidence", dest="choose_evidence", default=None,
                   help="choose each entry's set on this evidence (.safetensors: read if it exists, else collected over "
                   "--choose-split and written there) and certify on every calibration document; default: choose on "
                   "even calibration documents, certify on odd ones")
    p.add_argument("--choose-split", dest="choose_split", default=None,
                   help="split the choosing evidence is collected on (default train; never test or the calibration split)")
    p.add_argument("--choose-max-docs", dest="choose_max_docs", type=int, default=None,
                   help="collect the choosing evidence on at most this many documents, evenly spread (default all)")


def check_choose_flags(args: argparse.Namespace, calibration_meta: dict[str, Any], allow_test_split: bool = False) -> None:
    """Flag errors before any model is loaded."""
    from ..var.tables import stats_documents

    if not args.choose_evidence:
        if args.choose_split is not None or args.choose_max_docs is not None:
            raise InvalidInputError("--choose-split / --choose-max-docs need --choose-evidence (where the evidence goes)")
        return
    if args.choose_max_docs is not None and args.choose_max_docs < 1:
        raise InvalidInputError("--choose-max-docs must be >= 1")
    split = args.choose_split or "train"
    if split == "test" and not allow_test_split:
        raise InvalidInputError("--choose-split test: the test split scores the tables, so it may not choose them; "
                                "choose on train (or pass --allow-test-split to do it anyway)")
    if split == stats_documents(calibration_meta)[1]:
        raise InvalidInputError(f"--choose-split {split!r} is the split the tables are certified on; choose on another "
                                "(e.g. train)")


def choose_evidence_from_args(args: argparse.Namespace, calibration_meta: dict[str, Any], model: Any, adapter: Any,
                              tokenizer: Any) -> Any:
    """The choosing evidence of `--choose-evidence` (read, or collected over the calibration capture's
    dataset and max_length on --choose-split and written), or None for the even/odd scheme."""
    from pathlib import Path

    from ..var.evidence import Evidence
    from ..var.tables import evidence_for_split, stats_documents

    if not args.choose_evidence:
        return None
    path = Path(args.choose_evidence)
    if path.exists():
        return Evidence.load(path)
    dataset, _, max_length, _ = stats_documents(calibration_meta)
    ev = evidence_for_split(model, adapter, tokenizer, dataset, args.choose_split or "train", max_length,
                            args.choose_max_docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    ev.save(path)
    return ev
