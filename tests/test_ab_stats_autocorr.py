"""A/B intervals under correlated windows: block bootstrap and AR(1)-corrected t, against brute force
and by simulated coverage. Run: `pytest tests/test_ab_stats_autocorr.py`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis_jobs import ab_stats


def ar1(rng: np.random.Generator, n: int, rho: float, reps: int) -> np.ndarray:
    """(reps, n) stationary AR(1) series with unit innovations."""
    x = np.empty((reps, n))
    x[:, 0] = rng.normal(size=reps) / math.sqrt(1 - rho * rho)
    for t in range(1, n):  # a loop over time steps of a simulated series, vectorised over repeats
        x[:, t] = rho * x[:, t - 1] + rng.normal(size=reps)
    return x


def test_block_indices_equal_a_loop_and_block_one_is_the_plain_bootstrap():
    n, block, n_boot = 10, 3, 50
    idx = ab_stats.block_indices(n, block, n_boot, np.random.default_rng(3))
    starts = np.random.default_rng(3).integers(0, n, size=(n_boot, 4))
    for row, st in zip(idx, starts):  # brute force: concatenate wrapped runs, cut to n
        want = []
        for s in st:
            want.extend((s + j) % n for j in range(block))
        assert row.tolist() == want[:n]
    plain = np.random.default_rng(5).integers(0, n, size=(n_boot, n))
    assert np.array_equal(ab_stats.block_indices(n, 1, n_boot, np.random.default_rng(5)), plain)


def test_paired_ratio_block_interval_equals_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(8, 12, 20), rng.uniform(9, 11, 20)
    r = ab_stats.paired_ratio_ci(a, b, n_boot=400, seed=9, block=4)
    assert r["block"] == 4 and r["ratio"] == pytest.approx(a.mean() / b.mean())
    idx = ab_stats.block_indices(20, 4, 400, np.random.default_rng(9))
    boot = [a[row].mean() / b[row].mean() for row in idx]
    assert (r["lo"], r["hi"]) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])))
    assert ab_stats.paired_ratio_ci(a, b, n_boot=50)["block"] == ab_stats.block_length(20) == 3
    with pytest.raises(ValueError):
        ab_stats.paired_ratio_ci(a, b, block=0)


def test_mean_ci_shrinks_sample_size_for_positive_autocorrelation_only():
    x = np.array([1.0, 1.2, 1.5, 1.4, 1.1, 0.9, 0.8, 1.0, 1.3, 1.6, 1.7, 1.4])
    r = ab_stats.lag1_autocorrelation(x)
    d = x - x.mean()
    assert r == pytest.approx(sum(d[i] * d[i + 1] for i in range(len(x) - 1)) / sum(d * d))
    assert r > 0
    got = ab_stats.mean_ci(x)
    n_eff = len(x) * (1 - r) / (1 + r)
    half = stats.t.ppf(0.975, n_eff - 1) * x.std(ddof=1) / math.sqrt(n_eff)
    assert got["n_eff"] == pytest.approx(n_eff) and got["hi"] - got["mean"] == pytest.approx(half)
    plain = ab_stats.mean_ci(x, autocorrelation=False)
    assert plain["hi"] - plain["lo"] < got["hi"] - got["lo"]
    alternating = [1.0, 2.0] * 6  # negative autocorrelation: the plain interval, never narrower
    plain_alt = ab_stats.mean_ci(alternating, autocorrelation=False)
    assert ab_stats.mean_ci(alternating)["hi"] == pytest.approx(plain_alt["hi"])


def test_correlated_windows_coverage_block_and_corrected_t_beat_the_independent_versions():
    """24 windows of AR(1) noise (rho 0.6) around known means: the intervals that assume
    independent windows miss the truth far more often than 5%; the corrected ones come closer."""
    rng = np.random.default_rng(11)
    reps, n, rho = 300, 24, 0.6
    a = 100 + 5 * ar1(rng, n, rho, reps)
    b = 125 + 5 * ar1(rng, n, rho, reps)
    true_ratio = 100 / 125
    cover = {"plain": 0, "block": 0, "t_plain": 0, "t_corr": 0}
    for i in range(reps):
        for name, block in (("plain", 1), ("block", None)):
            r = ab_stats.paired_ratio_ci(a[i], b[i], n_boot=400, seed=i, block=block)
            cover[name] += r["lo"] <= true_ratio <= r["hi"]
        for name, corr in (("t_plain", False), ("t_corr", True)):
            m = ab_stats.mean_ci(a[i], autocorrelation=corr)
            cover[name] += m["lo"] <= 100 <= m["hi"]
    share = {k: v / reps for k, v in cover.items()}
    assert share["plain"] < 0.85 and share["t_plain"] < 0.85, share  # too narrow when windows correlate
    assert share["block"] > share["plain"] + 0.05, share
    assert share["t_corr"] > share["t_plain"] + 0.05 and share["t_corr"] > 0.85, share
