"""Percentile bootstrap over documents: the shared interval helper of the validation package.

Documents (test sequences), not tokens, are the independent units: tokens of one document share
its topic and vocabulary, so a token-level resample would give intervals that are too narrow.
`document_resamples(d, resamples, seed)` draws one (R, D) index matrix of documents sampled with
replacement; `ratio_ci95(num_D, den_D, pick_RD)` is the 95% percentile interval of
sum(num) / sum(den) over those resamples (one gather and two row sums, no loop over resamples).
Used by `served.py` and `predictability.py`. Test: `pytest tests/test_validation_predictability.py`.
"""

from __future__ import annotations

import numpy as np


def document_resamples(num_documents: int, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """(R, D) indices of documents drawn with replacement, one row per bootstrap resample."""
    return np.random.default_rng(seed).integers(0, num_documents, size=(resamples, num_documents))


def ratio_ci95(num_D: np.ndarray, den_D: np.ndarray, pick_RD: np.ndarray) -> list[float]:
    """95% percentile interval of sum(num) / sum(den) under the document resamples `pick_RD`."""
    num_D, den_D = np.asarray(num_D, dtype=float), np.asarray(den_D, dtype=float)
    ratio_R = num_D[pick_RD].sum(1) / np.maximum(den_D[pick_RD].sum(1), 1e-12)
    lo, hi = np.percentile(ratio_R, [2.5, 97.5])
    return [float(lo), float(hi)]


def difference_ci95(num_a_D: np.ndarray, num_b_D: np.ndarray, den_D: np.ndarray, pick_RD: np.ndarray) -> list[float]:
    """95% interval of (sum(a) - sum(b)) / sum(den): a paired difference of two rates on the same documents."""
    return ratio_ci95(np.asarray(num_a_D, dtype=float) - np.asarray(num_b_D, dtype=float), den_D, pick_RD)
