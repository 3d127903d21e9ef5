"""Statistics behind the Phase 1 hypothesis report, each a small function on numpy arrays.

- `zipf_fit(freq)`: least-squares slope and R^2 of log frequency against log rank.
- `spearman_ci(x, y, n_boot, seed)`: Spearman rho, its p-value and a seeded percentile-bootstrap
  95% CI (all resamples ranked at once, no Python loop over resamples).
- `plugin_entropy(counts_NE)`, `miller_madow_entropy(counts_NE)`: entropy (nats) of each row's
  empirical distribution, raw and with the Miller-Madow bias correction.
- `equal_n_entropy(counts_NE, n)`: the EXPECTED plug-in entropy of a size-n subsample drawn
  without replacement from each row's counts (exact, via the hypergeometric distribution), so
  tokens are compared at the same sample size. Rows with fewer than n occurrences get NaN.
- `coverage(freq, score, min_freq, max_score)`: share of occurrences whose token passes both
  thresholds; `coverage_curve` evaluates it on a grid of thresholds at once.

Why equal sample sizes: the plug-in entropy of a token seen once is 0 and a token seen 10^5
times has 10^5 chances to stray, so raw empirical entropy correlates with frequency for purely
statistical reasons. Test: `pytest tests/test_validation_stats.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from ..errors import InvalidInputError


@dataclass(frozen=True)
class ZipfFit:
    slope: float  # d log(frequency) / d log(rank); about -1 for Zipf's law
    intercept: float
    r_squared: float
    num_tokens: int


def zipf_fit(freq: np.ndarray) -> ZipfFit:
    """Fit log f = a + b log r over tokens with f > 0, ranks 1..n by descending frequency."""
    f = np.sort(np.asarray(freq, dtype=np.float64)[np.asarray(freq) > 0])[::-1]
    if f.size < 3:
        return ZipfFit(float("nan"), float("nan"), float("nan"), int(f.size))
    x = np.log(np.arange(1, f.size + 1, dtype=np.float64))
    y = np.log(f)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return ZipfFit(float(slope), float(intercept), r2, int(f.size))


@dataclass(frozen=True)
class SpearmanResult:
    rho: float
    p_value: float
    ci_low: float  # percentile bootstrap, 95%
    ci_high: float
    n: int
    n_boot: int


def _rowwise_pearson(a_BN: np.ndarray, b_BN: np.ndarray) -> np.ndarray:
    a = a_BN - a_BN.mean(axis=1, keepdims=True)
    b = b_BN - b_BN.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=1) / den


def spearman_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> SpearmanResult:
    """Spearman rho (ties averaged) with p-value and a seeded bootstrap CI over (x, y) pairs.

    NaN pairs are dropped. Resamples are ranked in one `rankdata(axis=1)` call; chunks bound memory.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return SpearmanResult(float("nan"), float("nan"), float("nan"), float("nan"), n, n_boot)
    res = sps.spearmanr(x, y)
    rng = np.random.default_rng(seed)
    rhos = []
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx_BN = rng.integers(0, n, size=(b, n))
        rx = sps.rankdata(x[idx_BN], axis=1)
        ry = sps.rankdata(y[idx_BN], axis=1)
        rhos.append(_rowwise_pearson(rx, ry))
        done += b
    boot = np.concatenate(rhos) if rhos else np.array([])
    boot = boot[np.isfinite(boot)]
    alpha = (1.0 - level) / 2
    lo, hi = (np.quantile(boot, [alpha, 1 - alpha]) if boot.size else (np.nan, np.nan))
    return SpearmanResult(float(res.statistic), float(res.pvalue), float(lo), float(hi), n, n_boot)


def _xlogx_over(c: np.ndarray, n: np.ndarray) -> np.ndarray:
    """-(c/n) ln(c/n) with 0 where c == 0 (broadcasting)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = c / n
        return np.where(c > 0, -p * np.log(np.where(c > 0, p, 1.0)), 0.0)


def plugin_entropy(counts_NE: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row's empirical distribution; NaN for an all-zero row."""
    c = np.asarray(counts_NE, dtype=np.float64)
    n = c.sum(axis=1, keepdims=True)
    h = _xlogx_over(c, np.where(n > 0, n, 1.0)).sum(axis=1)
    return np.where(n[:, 0] > 0, h, np.nan)


def miller_madow_entropy(counts_NE: np.ndarray) -> np.ndarray:
    """Plug-in entropy + (m - 1) / (2N), m = number of non-empty bins (Miller 1955)."""
    c = np.asarray(counts_NE, dtype=np.float64)
    n = c.sum(axis=1)
    m = (c > 0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return plugin_entropy(c) + np.where(n > 0, (m - 1) / (2.0 * n), np.nan)


def equal_n_entropy(counts_NE: np.ndarray, n: int) -> np.ndarray:
    """Expected plug-in entropy of an n-draw subsample without replacement from each row.

    E[H] = sum_e sum_x P(X_e = x) * (-(x/n) ln(x/n)), X_e ~ Hypergeom(N, c_e, n) exactly; the
    expectation is linear so no joint distribution is needed. NaN where a row has N < n.
    """
    if n < 1:
        raise InvalidInputError("the equal-sample-size n must be at least 1")
    c = np.asarray(counts_NE, dtype=np.int64)
    total_N = c.sum(axis=1)
    out = np.full(c.shape[0], np.nan)
    ok = total_N >= n
    if not ok.any():
        return out
    cc = c[ok]
    big_N = np.broadcast_to(total_N[ok][:, None, None], cc.shape + (n + 1,))
    x_X = np.arange(n + 1, dtype=np.float64)
    pmf = sps.hypergeom.pmf(x_X[None, None, :], big_N, cc[:, :, None], n)  # (rows, E, n+1)
    fx = _xlogx_over(x_X, float(n))
    out[ok] = np.nansum(pmf * fx, axis=(1, 2))
    return out


def coverage(freq: np.ndarray, score: np.ndarray, min_freq: float, max_score: float) -> float:
    """Share of occurrences (frequency-weighted) whose token has freq >= min_freq and score < max_score."""
    f = np.asarray(freq, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    total = f.sum()
    if total <= 0:
        return float("nan")
    return float(f[(f >= min_freq) & (s < max_score)].sum() / total)


def coverage_curve(freq: np.ndarray, score: np.ndarray, min_freq: float, thresholds: np.ndarray) -> np.ndarray:
    """`coverage` at every threshold of a grid, vectorised (no loop over thresholds)."""
    f = np.asarray(freq, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    total = f.sum()
    if total <= 0:
        return np.full(t.shape, np.nan)
    keep = f >= min_freq
    order = np.argsort(s[keep], kind="stable")
    s_sorted = s[keep][order]
    cum = np.concatenate([[0.0], np.cumsum(f[keep][order])])
    return cum[np.searchsorted(s_sorted, t, side="left")] / total


def share_below(values: np.ndarray, threshold: float, weights: np.ndarray | None = None) -> float:
    """Share of entries (or of weight) with value < threshold; NaN values are excluded."""
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(v)
    den = w[ok].sum()
    return float(w[ok & (v < threshold)].sum() / den) if den > 0 else float("nan")


def weighted_quantiles(values: np.ndarray, qs: list[float], weights: np.ndarray | None = None) -> list[float]:
    """Quantiles of `values`, optionally weighted (e.g. by frequency = per occurrence)."""
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(v) & (w > 0)
    v, w = v[ok], w[ok]
    if v.size == 0:
        return [float("nan")] * len(qs)
    order = np.argsort(v)
    cw = np.cumsum(w[order])
    cw /= cw[-1]
    return [float(v[order][min(np.searchsorted(cw, q, side="left"), v.size - 1)]) for q in qs]
