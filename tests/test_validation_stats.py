"""Report statistics against brute-force references on small synthetic inputs.

Run: `pytest tests/test_validation_stats.py`.
"""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from var_moe.validation import stats
from var_moe.validation.config import ValidationConfig


def _h(counts):
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts if c)


def test_plugin_and_miller_madow_entropy():
    counts = np.array([[5, 0, 0, 0], [1, 1, 1, 1], [3, 1, 0, 2], [0, 0, 0, 0]])
    h = stats.plugin_entropy(counts)
    for row, want in zip(counts[:3], h[:3]):
        assert want == pytest.approx(_h(row.tolist()))
    assert np.isnan(h[3])
    mm = stats.miller_madow_entropy(counts)
    assert mm[2] == pytest.approx(_h([3, 1, 2]) + (3 - 1) / (2 * 6))


def test_equal_n_entropy_matches_enumeration_of_subsamples():
    # Enumerate every n-subset of the occurrences (without replacement) and average the plug-in entropy
    counts = np.array([[4, 2, 1, 0], [2, 2, 2, 1], [7, 0, 0, 0], [1, 1, 0, 0]])
    n = 3
    got = stats.equal_n_entropy(counts, n)
    for row, g in zip(counts, got):
        occ = [e for e, c in enumerate(row) for _ in range(c)]
        if len(occ) < n:
            assert np.isnan(g)
            continue
        hs = [_h(np.bincount(list(sub), minlength=4).tolist()) for sub in itertools.combinations(occ, n)]
        assert g == pytest.approx(np.mean(hs), abs=1e-12)
    with pytest.raises(ValueError):
        stats.equal_n_entropy(counts, 0)


def test_equal_n_removes_the_sample_size_trend():
    # Same true distribution at very different sample sizes: equal-n entropies agree, and a size-n
    # token's plug-in entropy is on the same scale (not the biased-low value of a smaller sample)
    p = np.array([0.7, 0.2, 0.1, 0.0])
    counts = np.stack([np.round(p * m).astype(int) for m in (200, 2000, 20000)])
    eq = stats.equal_n_entropy(counts, 10)
    assert np.ptp(eq) < 0.01
    assert eq[0] < stats.plugin_entropy(counts)[0]  # the subsample sees fewer rare experts
    assert np.isnan(stats.equal_n_entropy(np.array([[1, 0]]), 10)[0])


def test_spearman_ci_reproducible_and_matches_scipy_and_brute_bootstrap():
    rng = np.random.default_rng(1)
    x = rng.zipf(1.5, 200).astype(float)
    y = -np.log(x) + rng.normal(0, 1, 200)
    a = stats.spearman_ci(x, y, n_boot=200, seed=3)
    b = stats.spearman_ci(x, y, n_boot=200, seed=3)
    assert a == b
    ref = sps.spearmanr(x, y)
    assert a.rho == pytest.approx(ref.statistic)
    assert a.p_value == pytest.approx(ref.pvalue)
    # brute-force bootstrap with the same index stream
    g = np.random.default_rng(3)
    idx = g.integers(0, 200, size=(200, 200))
    boots = [sps.spearmanr(x[i], y[i]).statistic for i in idx]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    assert a.ci_low == pytest.approx(lo) and a.ci_high == pytest.approx(hi)
    assert a.ci_low <= a.rho <= a.ci_high
    c = stats.spearman_ci(x, y, n_boot=200, seed=4)
    assert c.ci_low != a.ci_low


def test_zipf_fit_recovers_slope():
    ranks = np.arange(1, 501)
    freq = np.round(1e5 * ranks**-1.2)
    fit = stats.zipf_fit(np.random.default_rng(0).permutation(freq))
    assert fit.slope == pytest.approx(-1.2, abs=0.02)
    assert fit.r_squared > 0.99


def test_coverage_and_curve_match_brute_force():
    rng = np.random.default_rng(2)
    freq = rng.integers(0, 50, 300)
    ent = rng.uniform(0, 2, 300)
    total = freq.sum()
    for mf, th in [(0, 0.5), (10, 1.0), (25, 0.2)]:
        want = sum(f for f, e in zip(freq, ent) if f >= mf and e < th) / total
        assert stats.coverage(freq, ent, mf, th) == pytest.approx(want)
    grid = np.linspace(0, 2, 17)
    curve = stats.coverage_curve(freq, ent, 10, grid)
    for t, c in zip(grid, curve):
        assert c == pytest.approx(stats.coverage(freq, ent, 10, t))


def test_weighted_quantiles_and_share_below():
    v = np.array([0.1, 0.2, 0.9, np.nan])
    assert stats.share_below(v, 0.5) == pytest.approx(2 / 3)
    assert stats.share_below(v, 0.5, np.array([1, 1, 8, 5])) == pytest.approx(0.2)
    assert stats.weighted_quantiles(np.array([1.0, 2, 3]), [0.5], np.array([1, 1, 10]))[0] == 3.0


def test_validation_config_roundtrip_and_errors():
    cfg = ValidationConfig(equal_n=5, n_boot=10)
    assert ValidationConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="equal_n"):
        ValidationConfig(equal_n=0)
    with pytest.raises(ValueError, match="unknown"):
        ValidationConfig.from_json('{"nope": 1}')
