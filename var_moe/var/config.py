"""`VARConfig`: every knob of the VAR router, a frozen validated dataclass with JSON round-trip.

The seed's field names are kept (frequency_threshold, entropy_threshold, routing_stats_path,
enable_var, track_performance, max_quality_degradation); the rest is what verified routing needs.
Unknown JSON fields and out-of-range values raise `ValueError` naming the field.
Test: `pytest tests/test_var_config.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

from ..errors import InvalidInputError

WEIGHT_SOURCES = ("table", "learned")
# fields of the removed context-cache tier (docs/PHASE2.md, "Context cache") that saved configs and tables
# files still carry: dropped on load (`from_dict` refuses a config that turns the tier on)
RETIRED = ("confidence_threshold", "cache_size", "cache_ttl_seconds", "cache_ttl_steps", "context_window_size",
           "cache_min_confirmations", "enable_cache")
MULTIPLICITY = ("bh", "holm", "none")


@dataclass(frozen=True)
class VARConfig:
    # -- which tokens enter the fast-path table (per layer, from calibration statistics) -------------
    frequency_threshold: int = 20  # minimum calibration occurrences of (layer, token)
    entropy_threshold: float | None = None  # maximum mean routing entropy: nats, or a share of ln E; None = no cap
    entropy_relative: bool = True  # True: entropy_threshold is a share of the maximum ln E (same meaning for any E)
    target_agreement: float = 0.9  # Wilson lower bound of exact top-k agreement must reach this
    confidence_level: float = 0.95  # two-sided level of the Wilson interval (0.95 -> z = 1.96; one-sided alpha 0.025)
    max_per_document: int | None = 16  # certifying occurrences one document may contribute (None = all)
    multiplicity: str = "bh"  # over all entries: bh (expected share of wrong entries) | holm (any wrong) | none
    pair_entries: bool = False  # also certify (previous, token) entries, served where the token has none (var/pairs.py)
    min_pair_count: int | None = None  # pair occurrences on the choosing side; None = frequency_threshold
    # -- tiers and weights -----------------------------------------------------------------------
    enable_fast_path: bool = True
    weights_source: str = "table"  # table: stored weights | learned: router weights restricted to the set
    adaptive_k: bool = False  # verified tokens with a dominant top expert use one expert
    adaptive_k_min_weight: float = 0.9  # table weight of the top expert (share of the set) needed for k=1
    # -- verification ----------------------------------------------------------------------------
    shadow_rate: float = 0.0  # share of fast decisions re-checked by the learned router
    shadow_min_checks: int = 20  # shadow checks of a token before its served agreement alone can demote it (0 = off)
    seed: int = 0  # seeds the shadow sampling
    # -- seed API --------------------------------------------------------------------------------
    routing_stats_path: str | None = None  # Phase 1 statistics (calibration split) to build tables from
    allow_test_split: bool = False  # build tables from statistics of the test split anyway (normally refused)
    enable_var: bool = True  # start with VAR on (switch with wrapper.enable_var()/disable_var())
    track_performance: bool = True  # keep per-layer tier counters
    max_quality_degradation: float = 0.01  # perplexity increase the evaluation accepts (1%)

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise InvalidInputError(f"VARConfig.{field} {what}, got {getattr(self, field)!r}")

        need(_int(self.frequency_threshold, 1), "frequency_threshold", "must be an integer >= 1")
        need(self.entropy_threshold is None or (_num(self.entropy_threshold) and self.entropy_threshold >= 0),
             "entropy_threshold", "must be >= 0 (nats) or null")
        need(self.entropy_threshold is None or not self.entropy_relative or self.entropy_threshold <= 1, "entropy_threshold",
             "must be in [0, 1] when entropy_relative is true (a share of ln E)")
        need(_num(self.target_agreement) and 0 < self.target_agreement <= 1, "target_agreement", "must be in (0, 1]")
        need(_num(self.confidence_level) and 0.5 <= self.confidence_level < 1, "confidence_level", "must be in [0.5, 1)")
        need(self.max_per_document is None or _int(self.max_per_document, 1), "max_per_document",
             "must be an integer >= 1 or null")
        need(self.multiplicity in MULTIPLICITY, "multiplicity", f"must be one of {MULTIPLICITY}")
        need(self.min_pair_count is None or _int(self.min_pair_count, 1), "min_pair_count",
             "must be an integer >= 1 or null")
        need(not self.pair_entries or self.entropy_threshold is None, "pair_entries",
             "needs entropy_threshold=None (pairs have no per-pair entropy)")
        need(self.weights_source in WEIGHT_SOURCES, "weights_source", f"must be one of {WEIGHT_SOURCES}")
        need(_num(self.adaptive_k_min_weight) and 0.5 < self.adaptive_k_min_weight <= 1,
             "adaptive_k_min_weight", "must be in (0.5, 1]")
        need(_num(self.shadow_rate) and 0 <= self.shadow_rate <= 1, "shadow_rate", "must be in [0, 1]")
        need(_int(self.shadow_min_checks, 0), "shadow_min_checks", "must be an integer >= 0")
        need(_num(self.max_quality_degradation) and self.max_quality_degradation >= 0, "max_quality_degradation", "must be >= 0")
        for f in fields(self):
            if f.type == "bool":  # the annotation (a string, from __future__ annotations)
                need(isinstance(getattr(self, f.name), bool), f.name, "must be true or false")
        need(isinstance(self.seed, int), "seed", "must be an integer")

    @property
    def wilson_z(self) -> float:
        """Normal quantile of the two-sided interval (1.96 for 95%)."""
        return NormalDist().inv_cdf(0.5 + self.confidence_level / 2)

    def entropy_limit_nats(self, num_experts: int) -> float:
        if self.entropy_threshold is None:
            return math.inf
        return self.entropy_threshold * math.log(num_experts) if self.entropy_relative else self.entropy_threshold

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VARConfig":
        if not isinstance(data, dict):
            raise InvalidInputError(f"a VAR config must be a JSON object, got {type(data).__name__}")
        if data.get("enable_cache"):
            raise InvalidInputError("VARConfig.enable_cache: the cached tier was removed (it paid nowhere it was "
                                    "measured, docs/PHASE2.md); set enable_cache to false or drop the field")
        data = {k: v for k, v in data.items() if k not in RETIRED}
        _refuse_unknown(data)
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "VARConfig":
        """From a JSON string or a path to a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.exists():
                raise FileNotFoundError(f"VAR config file {path} does not exist")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"VAR config is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "VARConfig":
        _refuse_unknown(changes)
        return replace(self, **changes)

    @classmethod
    def from_routing_stats(cls, path: str | Path, preset: str = "balanced", **overrides: Any) -> "VARConfig":
        """A preset pointed at a Phase 1 statistics file (checked to exist and be readable). The wrapper
        builds tables certified by document when the file names its documents, else in-sample and
        marked uncertified (statistics computed in memory; `var/in_sample.py`)."""
        from .stats_io import check_split, read_stats_metadata

        meta = read_stats_metadata(path)  # fails early with a clear message on a missing / foreign file
        check_split(meta, str(path), bool(overrides.get("allow_test_split", False)))
        return get_preset(preset).replace(routing_stats_path=str(path), **overrides)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _refuse_unknown(names: Any) -> None:
    known = {f.name for f in fields(VARConfig)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise InvalidInputError(f"unknown VARConfig field(s) {unknown}; known fields: {sorted(known)}")


# Every preset certifies (previous token, token) entries too: on held-out text they add coverage at
# the same agreement at every target (docs/PHASE2.md, "A (previous token, token) tier").


def get_conservative_config() -> VARConfig:
    """Target 95%: every entry certified at 95% on held-out documents (docs/PHASE2.md, frontier)."""
    return VARConfig(frequency_threshold=50, target_agreement=0.95, pair_entries=True)


def get_balanced_config() -> VARConfig:
    """Target 90%, no entropy cap (entropy does not track consistency), <= 16 occurrences per document,
    token and (previous, token) entries."""
    return VARConfig(pair_entries=True)


def get_aggressive_config() -> VARConfig:
    """Target 80%: more tokens on the fast path at a lower certified agreement."""
    return VARConfig(frequency_threshold=5, target_agreement=0.8, pair_entries=True)


PRESETS = {"conservative": get_conservative_config, "balanced": get_balanced_config, "aggressive": get_aggressive_config}


def get_preset(name: str) -> VARConfig:
    if name not in PRESETS:
        raise InvalidInputError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]()
