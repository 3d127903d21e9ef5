"""A/B statistics and /metrics parsing against brute-force references."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from analysis_jobs import ab_stats
from analysis_jobs.prom import diff, histogram_quantile, parse_metrics, series


def exposition(tokens: dict[str, float], latencies: list[float]) -> str:
    r = CollectorRegistry()
    c = Counter("varmoe_generated_tokens", "t", ["mode"], registry=r)
    for m, v in tokens.items():
        c.labels(mode=m).inc(v)
    h = Histogram("varmoe_request_duration_seconds", "d", ["endpoint", "mode"], buckets=(0.1, 0.5, 1, 5), registry=r)
    for x in latencies:
        h.labels(endpoint="/v1/generate", mode="var").observe(x)
    return generate_latest(r).decode()


def test_series_and_diff():
    a = parse_metrics(exposition({"var": 10, "baseline": 4}, []))
    b = parse_metrics(exposition({"var": 25, "baseline": 5}, []))
    assert series(b, "varmoe_generated_tokens_total", mode="var") == 25
    assert series(b, "varmoe_generated_tokens_total") == 30
    assert series(diff(b, a), "varmoe_generated_tokens_total", mode="baseline") == 1


def test_histogram_quantile_matches_prometheus_interpolation():
    rng = random.Random(0)
    xs = [rng.uniform(0, 4) for _ in range(500)]
    s = parse_metrics(exposition({}, xs))
    bounds = [0.0, 0.1, 0.5, 1.0, 5.0]
    for q in (0.5, 0.9, 0.99):
        # brute force: find the bucket holding rank q*n, interpolate linearly inside it
        rank = q * len(xs)
        counts = [sum(1 for x in xs if x <= b) for b in bounds[1:]]
        i = next(i for i, c in enumerate(counts) if c >= rank)
        lo_count = counts[i - 1] if i else 0
        want = bounds[i] + (bounds[i + 1] - bounds[i]) * (rank - lo_count) / (counts[i] - lo_count)
        assert histogram_quantile(s, "varmoe_request_duration_seconds", q, mode="var") == pytest.approx(want)
    assert histogram_quantile(s, "varmoe_request_duration_seconds", 0.5, mode="baseline") is None


def test_window_rates_drop_the_stub_window():
    snaps = []
    total = {"var": 0.0, "baseline": 0.0}
    for k, t in enumerate([0.0, 5.0, 10.0, 15.0, 15.4]):
        snaps.append((t, parse_metrics(exposition(dict(total), []))))
        total["var"] += 10 * (k + 1)
        total["baseline"] += 5
    rows = ab_stats.window_rates(snaps, "varmoe_generated_tokens_total", "mode", ("var", "baseline"))
    assert len(rows) == 3  # the 0.4 s window at the end is left out
    assert [r["var"] for r in rows] == pytest.approx([10 / 5, 20 / 5, 30 / 5])
    assert [r["baseline"] for r in rows] == pytest.approx([1.0, 1.0, 1.0])


def test_mean_ci_matches_t_interval():
    from scipy import stats

    x = [3.0, 4.0, 5.5, 2.0, 4.4]
    r = ab_stats.mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert (r["lo"], r["hi"]) == pytest.approx((lo, hi))
    assert ab_stats.mean_ci([])["mean"] is None


def test_paired_bootstrap_ppl_equals_a_loop():
    rng = np.random.default_rng(1)
    n = 12
    tokens = rng.integers(20, 200, n)
    nb = tokens * rng.uniform(2.0, 4.0, n)
    nv = nb + tokens * rng.normal(0.01, 0.02, n)
    r = ab_stats.paired_bootstrap_ppl(nv, nb, tokens, n_boot=300, seed=7)
    assert r["ratio"] == pytest.approx(math.exp((nv.sum() - nb.sum()) / tokens.sum()))
    idx = np.random.default_rng(7).integers(0, n, size=(300, n))
    loop = []
    for row in idx:  # brute force, one resample at a time
        s_v = sum(nv[i] for i in row)
        s_b = sum(nb[i] for i in row)
        s_t = sum(tokens[i] for i in row)
        loop.append(math.exp(s_v / s_t) / math.exp(s_b / s_t))
    assert r["ratio_lo"] == pytest.approx(np.quantile(loop, 0.025))
    assert r["ratio_hi"] == pytest.approx(np.quantile(loop, 0.975))
    with pytest.raises(ValueError):
        ab_stats.paired_bootstrap_ppl([1.0], [1.0, 2.0], [3, 4])


def test_paired_ratio_and_service_windows():
    a, b = [10.0, 12.0, 11.0, None], [5.0, 6.0, 5.5, 4.0]
    r = ab_stats.paired_ratio_ci(a, b, n_boot=200, seed=0)
    assert r["ratio"] == pytest.approx(33 / 16.5) and r["n"] == 3 and r["lo"] <= r["ratio"] <= r["hi"]
    rows = []
    rng = random.Random(0)
    for i in range(40):
        mode = "var" if i % 2 else "baseline"
        total, queue = rng.uniform(0.2, 1.0), rng.uniform(0, 0.1)
        rows.append({"t": 100 + i * 0.5, "status": 200, "endpoint": "generate", "mode": mode,
                     "generated_tokens": 16, "timings": {"total_s": total, "queue_s": queue}})
    rows.append({"t": 101, "status": 429, "endpoint": "generate", "mode": None})
    w = ab_stats.service_windows(rows, 5.0)
    for k, win in enumerate(w):
        for m in ("var", "baseline"):
            sel = [r for r in rows if r["status"] == 200 and r["mode"] == m and k * 5 <= r["t"] - 100 < (k + 1) * 5]
            want = sum(r["generated_tokens"] for r in sel) / sum(r["timings"]["total_s"] - r["timings"]["queue_s"] for r in sel)
            assert win[m] == pytest.approx(want)


def test_percentiles():
    x = list(range(101))
    p = ab_stats.percentiles(x)
    assert (p["p50"], p["p90"], p["p99"], p["n"]) == (50.0, 90.0, 99.0, 101)
