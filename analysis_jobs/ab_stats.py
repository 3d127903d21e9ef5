"""Statistics of the A/B job: windowed rates, confidence intervals, paired bootstrap, percentiles.

- `window_rates(snapshots, name, label)`: per consecutive /metrics snapshots, the increase of a
  counter per second for each label value (tokens/s per mode per window).
- `mean_ci(x, autocorrelation=True)`: mean with a Student-t interval over windows whose sample
  size is reduced for positive lag-1 autocorrelation (n_eff = n (1 - r) / (1 + r), the AR(1)
  variance inflation of a mean): neighbouring windows share batches and load, so treating them as
  independent would make the interval too narrow. `autocorrelation=False` is the plain t interval.
- `service_windows(rows, window_s)`: per window and mode, generated tokens per second of model time
  (sum of generated tokens / sum of (total - queue) seconds over the requests finishing in it).
- `paired_ratio_ci(a, b)`: circular block bootstrap over windows (pairs resampled together, in
  runs of `block` consecutive windows, default round(n^(1/3))) of mean(a) / mean(b); block=1 is
  the ordinary bootstrap. Blocks keep the short-range correlation of neighbouring windows inside
  each resample (Politis & Romano 1992), so the interval is not narrowed by it.
- `paired_bootstrap_ppl(...)`: paired bootstrap over texts of perplexity(var) / perplexity(base).
- `percentiles(x)`: p50 / p90 / p99 (numpy's linear interpolation).
All resampling is vectorized (one index matrix); test: `pytest tests/test_ab_stats.py`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from .prom import Samples, series

QUANTILES = (0.5, 0.9, 0.99)


def window_rates(snapshots: list[tuple[float, Samples]], name: str, label: str, values: tuple[str, ...]) -> list[dict]:
    """[{t_s (window end, from the first snapshot), dt_s, <value>: rate, ...}] per snapshot pair.

    Windows shorter than half the longest one (the last, cut by the final snapshot) are left out.
    """
    rows = []
    if len(snapshots) < 2:
        return rows
    t0 = snapshots[0][0]
    full = max(tb - ta for (ta, _), (tb, _) in zip(snapshots, snapshots[1:]))
    for (ta, a), (tb, b) in zip(snapshots, snapshots[1:]):
        dt = tb - ta
        if dt < 0.5 * full:  # the stub window at the end (final snapshot) would add noise, not data
            continue
        row = {"t_s": tb - t0, "dt_s": dt}
        for v in values:
            row[v] = (series(b, name, **{label: v}) - series(a, name, **{label: v})) / dt
        rows.append(row)
    return rows


def lag1_autocorrelation(x) -> float:
    """Sample lag-1 autocorrelation (0 for fewer than 3 values or a constant series)."""
    x = np.asarray(x, dtype=float)
    if len(x) < 3:
        return 0.0
    d = x - x.mean()
    den = float((d * d).sum())
    return float((d[1:] * d[:-1]).sum() / den) if den > 0 else 0.0


def mean_ci(x, level: float = 0.95, autocorrelation: bool = True) -> dict:
    x = np.asarray([v for v in x if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    m = float(x.mean())
    if n < 2:
        return {"mean": m, "lo": None, "hi": None, "n": 1}
    # negative autocorrelation would shrink the interval: never narrower than the plain t interval
    r = min(max(lag1_autocorrelation(x), 0.0), 0.95) if autocorrelation else 0.0
    n_eff = max(n * (1 - r) / (1 + r), 2.0)
    half = float(sps.t.ppf(0.5 + level / 2, n_eff - 1) * x.std(ddof=1) / math.sqrt(n_eff))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n, "n_eff": n_eff, "lag1_autocorr": r}


def block_length(n: int) -> int:
    """Rule-of-thumb block length for a block bootstrap of a mean: round(n^(1/3)), at least 1."""
    return max(1, round(n ** (1 / 3)))


def block_indices(n: int, block: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) indices of circular block resamples: runs of `block` consecutive positions
    (wrapping around) from uniform starts, cut to n. block=1 draws exactly `integers(0, n, (n_boot, n))`."""
    n_blocks = -(-n // block)
    starts = rng.integers(0, n, size=(n_boot, n_blocks))
    return ((starts[:, :, None] + np.arange(block)) % n).reshape(n_boot, n_blocks * block)[:, :n]


def service_windows(rows: list[dict], window_s: float, modes=("var", "baseline")) -> list[dict]:
    """Per window (by completion time) and mode: generated tokens / model seconds of generate requests."""
    done = [r for r in rows if r.get("status") == 200 and r.get("endpoint", "").startswith("generate")
            and r.get("mode") in modes and r.get("generated_tokens") and r.get("timings")]
    if not done:
        return []
    t0 = min(r["t"] for r in done)
    acc: dict[int, dict[str, list[float]]] = {}
    for r in done:
        w = int((r["t"] - t0) // window_s)
        service = r["timings"]["total_s"] - r["timings"]["queue_s"]
        if service <= 0:
            continue
        slot = acc.setdefault(w, {m: [0.0, 0.0] for m in modes})[r["mode"]]
        slot[0] += r["generated_tokens"]
        slot[1] += service
    out = []
    for w in sorted(acc):
        row = {"t_s": (w + 1) * window_s}
        for m in modes:
            tokens, secs = acc[w][m]
            row[m] = tokens / secs if secs > 0 else None
        out.append(row)
    return out


def paired_ratio_ci(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95, block: int | None = None) -> dict:
    """mean(a) / mean(b) over paired windows, with a circular block bootstrap interval (pairs
    resampled together; `block` consecutive windows per draw, default `block_length(n)`)."""
    pairs = np.array([(x, y) for x, y in zip(a, b) if x is not None and y is not None], dtype=float).reshape(-1, 2)
    n = len(pairs)
    if n == 0 or pairs[:, 1].mean() <= 0:
        return {"ratio": None, "lo": None, "hi": None, "n": n}
    ratio = float(pairs[:, 0].mean() / pairs[:, 1].mean())
    if n < 2:
        return {"ratio": ratio, "lo": None, "hi": None, "n": n}
    block = block_length(n) if block is None else block
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    idx = block_indices(n, min(block, n), n_boot, np.random.default_rng(seed))
    boot = pairs[idx, 0].mean(axis=1) / pairs[idx, 1].mean(axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"ratio": ratio, "lo": float(lo), "hi": float(hi), "n": n, "block": min(block, n)}


def paired_bootstrap_ppl(nll_var, nll_base, tokens, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Perplexity ratio var / base over the same texts (per-text summed NLL in nats, token counts).

    Overall perplexity pools tokens: exp(sum NLL / sum tokens). Texts are resampled with their pair
    (the same text in both modes), which removes the text-to-text variance from the comparison.
    """
    nv, nb, nt = (np.asarray(x, dtype=float) for x in (nll_var, nll_base, tokens))
    if not (len(nv) == len(nb) == len(nt)) or len(nt) == 0:
        raise ValueError("per-text NLL of both modes and token counts must be non-empty and of equal length")
    ppl_v, ppl_b = math.exp(nv.sum() / nt.sum()), math.exp(nb.sum() / nt.sum())
    idx = np.random.default_rng(seed).integers(0, len(nt), size=(n_boot, len(nt)))
    log_ratio = (nv[idx].sum(axis=1) - nb[idx].sum(axis=1)) / nt[idx].sum(axis=1)
    lo, hi = np.exp(np.quantile(log_ratio, [(1 - level) / 2, (1 + level) / 2]))
    return {"ppl_var": ppl_v, "ppl_baseline": ppl_b, "ratio": ppl_v / ppl_b, "ratio_lo": float(lo),
            "ratio_hi": float(hi), "texts": int(len(nt)), "tokens": int(nt.sum()), "n_boot": n_boot}


def percentiles(x, qs=QUANTILES) -> dict:
    x = np.asarray([v for v in x if v is not None], dtype=float)
    if len(x) == 0:
        return {f"p{round(q * 100)}": None for q in qs} | {"n": 0}
    return {f"p{round(q * 100)}": float(np.quantile(x, q)) for q in qs} | {"n": int(len(x))}
