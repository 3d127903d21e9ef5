"""Thresholds and sample sizes of the hypothesis report, as one frozen, validated dataclass.

`ValidationConfig.from_json(cfg.to_json()) == cfg`. The success criteria are the seed's and are
kept as fields so a report states exactly what it tested. Test: `pytest tests/test_validation_stats.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from ..errors import InvalidInputError


@dataclass(frozen=True)
class ValidationConfig:
    fast_path_min_frequency: int = 10  # a token needs this many occurrences to enter the fast path
    fast_path_max_entropy: float = 0.5  # ... and a mean router entropy below this (nats)
    fast_path_min_consistency: float = 0.9  # the consistency-based variant of the fast path
    equal_n: int = 20  # sample size at which tokens' top-1 entropies are compared (hypergeometric)
    top_n_consistency: int = 1000  # "top-1000 consistency": the N most frequent tokens per layer
    n_boot: int = 1000  # bootstrap resamples for Spearman CIs
    seed: int = 0  # bootstrap RNG seed: the same seed gives the same CI
    # the seed's success criteria
    criterion_rho: float = -0.4  # Spearman(frequency, mean entropy) must be below this
    criterion_low_entropy_share: float = 0.30  # share of tokens with mean entropy < 0.5 nats
    criterion_coverage: float = 0.40  # fast-path share of occurrences
    criterion_consistency: float = 0.60  # mean top-1 consistency of the top-N tokens

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise InvalidInputError(f"validation config field {name!r} ({getattr(self, name)!r}): {why}")

        for name in ("fast_path_min_frequency", "equal_n", "top_n_consistency", "n_boot"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if not (self.fast_path_max_entropy > 0 and math.isfinite(self.fast_path_max_entropy)):
            bad("fast_path_max_entropy", "must be a positive number of nats")
        for name in ("fast_path_min_consistency", "criterion_low_entropy_share", "criterion_coverage",
                     "criterion_consistency"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must lie in [0, 1]")
        if not -1.0 <= self.criterion_rho <= 1.0:
            bad("criterion_rho", "must lie in [-1, 1]")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ValidationConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown validation config fields {unknown}; known: {sorted(known)}")
        return cls(**data)
