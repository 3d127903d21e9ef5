"""The Phase 1 hypothesis report: statistics per layer and overall, then the seed's criteria.

`build_report(df, metadata, config, heldout=None) -> dict` takes the statistics table (one row per
(layer, token_id), columns fixed in docs/ARCHITECTURE.md) and its metadata and returns a
JSON-ready dict; `render.py` turns it into text. "Overall" pools every (layer, token) row, except
the Zipf fit, which is a property of the token stream and uses one layer's frequencies.

Entropy bias: the router's mean entropy is an average of per-occurrence entropies and is not
biased by sample size; the entropy of a token's EMPIRICAL top-1 distribution is. For that one the
report compares tokens at an equal sample size n (the exact expected plug-in entropy of an n-draw
hypergeometric subsample; tokens seen fewer than n times are excluded) and also gives the
Miller-Madow-corrected estimate. Test: `pytest tests/test_validation_report.py`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InvalidInputError
from . import stats
from .config import ValidationConfig

REQUIRED_COLUMNS = ("layer", "token_id", "frequency", "mean_entropy", "mean_confidence", "mean_margin",
                    "expert_ids", "top1_counts", "routing_consistency")
ENTROPY_GRID = np.round(np.linspace(0.0, 1.0, 51), 4)  # fractions of ln E for coverage curves


def check_stats_frame(df: pd.DataFrame, metadata: dict[str, Any]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InvalidInputError(f"--input: statistics file lacks columns {missing} (has {list(df.columns)})")
    if len(df) == 0:
        raise InvalidInputError("--input: statistics file has no rows")
    if "num_experts" not in metadata:
        raise InvalidInputError("--input: statistics metadata lacks 'num_experts'")


def counts_matrix(df: pd.DataFrame, column: str = "top1_counts", num_experts: int | None = None) -> np.ndarray:
    """Sparse per-expert list column (aligned with `expert_ids`) -> (rows, E) int64 array."""
    from ..capture.schema import densify_experts

    if num_experts is None:
        num_experts = 1 + max((int(x.max()) for x in df["expert_ids"] if len(x)), default=0)
    return densify_experts(df, column, num_experts)


def _f(x: Any) -> float | None:
    """JSON-safe float (NaN -> None)."""
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _spearman(x: np.ndarray, y: np.ndarray, cfg: ValidationConfig) -> dict[str, Any]:
    r = stats.spearman_ci(x, y, n_boot=cfg.n_boot, seed=cfg.seed)
    return {"rho": _f(r.rho), "p_value": _f(r.p_value), "ci95": [_f(r.ci_low), _f(r.ci_high)], "n": r.n}


def _quant(values: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float | None]:
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    return {f"p{int(q * 100)}": _f(v) for q, v in zip(qs, stats.weighted_quantiles(values, qs, weights))}


def section(df: pd.DataFrame, metadata: dict[str, Any], cfg: ValidationConfig, zipf_freq: np.ndarray) -> dict[str, Any]:
    """All statistics for one slice of rows (a layer, or every layer pooled)."""
    ln_e = math.log(int(metadata["num_experts"]))
    freq = df["frequency"].to_numpy(np.float64)
    ent = df["mean_entropy"].to_numpy(np.float64)
    conf = df["mean_confidence"].to_numpy(np.float64)
    margin = df["mean_margin"].to_numpy(np.float64)
    cons = df["routing_consistency"].to_numpy(np.float64)
    c1 = counts_matrix(df, num_experts=int(metadata["num_experts"]))
    h_plugin = stats.plugin_entropy(c1)
    h_mm = stats.miller_madow_entropy(c1)
    h_eq = stats.equal_n_entropy(c1, cfg.equal_n)
    zipf = stats.zipf_fit(zipf_freq)
    out: dict[str, Any] = {
        "num_tokens": int((freq > 0).sum()),
        "num_occurrences": int(freq.sum()),
        "zipf": {"slope": _f(zipf.slope), "r_squared": _f(zipf.r_squared), "num_tokens": zipf.num_tokens},
        "spearman": {
            "frequency_vs_mean_entropy": _spearman(freq, ent, cfg),
            "frequency_vs_top1_entropy_plugin": _spearman(freq, h_plugin, cfg),
            "frequency_vs_top1_entropy_miller_madow": _spearman(freq, h_mm, cfg),
            f"frequency_vs_top1_entropy_equal_n{cfg.equal_n}": _spearman(freq, h_eq, cfg),
        },
        "entropy": {
            "share_tokens_below_0.5": _f(stats.share_below(ent, 0.5)),
            "share_tokens_below_1.0": _f(stats.share_below(ent, 1.0)),
            "share_occurrences_below_0.5": _f(stats.share_below(ent, 0.5, freq)),
            "share_occurrences_below_1.0": _f(stats.share_below(ent, 1.0, freq)),
            "mean_over_tokens": _f(np.nanmean(ent)),
            "mean_over_occurrences": _f(np.average(ent, weights=freq)),
            "quantiles_over_tokens": _quant(ent),
            "max_entropy_nats": ln_e,
        },
        "top1_entropy_equal_n": {
            "n": cfg.equal_n,
            "tokens_with_enough_samples": int(np.isfinite(h_eq).sum()),
            "share_tokens_below_0.5": _f(stats.share_below(h_eq, 0.5)),
            "quantiles_over_tokens": _quant(h_eq),
        },
        "confidence": {
            "quantiles_over_tokens": _quant(conf),
            "quantiles_over_occurrences": _quant(conf, freq),
            "share_occurrences_token_mean_above_0.5": _f(1 - stats.share_below(conf, 0.5, freq)),
            "share_occurrences_token_mean_above_0.9": _f(1 - stats.share_below(conf, 0.9, freq)),
        },
        "margin": {"quantiles_over_tokens": _quant(margin), "quantiles_over_occurrences": _quant(margin, freq)},
        "consistency_weighted_by_occurrences": _f(np.average(cons, weights=freq)),
    }
    out["coverage"] = {
        "entropy_rule": _f(stats.coverage(freq, ent, cfg.fast_path_min_frequency, cfg.fast_path_max_entropy)),
        # consistency >= c  <=>  -consistency < -c + tiny: reuse the "score below threshold" rule
        "consistency_rule": _f(stats.coverage(freq, -cons, cfg.fast_path_min_frequency,
                                              -cfg.fast_path_min_consistency + 1e-12)),
        "curve_entropy_thresholds_nats": [float(t * ln_e) for t in ENTROPY_GRID],
        "curve_entropy": [_f(v) for v in stats.coverage_curve(freq, ent, cfg.fast_path_min_frequency, ENTROPY_GRID * ln_e)],
    }
    return out


def top_n_consistency(df: pd.DataFrame, n: int) -> dict[str, Any]:
    top = df.nlargest(n, ["frequency", "token_id"]) if len(df) > n else df
    f = top["frequency"].to_numpy(np.float64)
    c = top["routing_consistency"].to_numpy(np.float64)
    return {"n": int(len(top)), "mean": _f(c.mean()), "occurrence_weighted_mean": _f(np.average(c, weights=f)),
            "min_frequency": int(f.min()) if len(f) else 0}


def consecutive_rates(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """Per-layer consecutive-token same-expert rates from the metadata, whatever key holds them."""
    for key in ("consecutive_rates", "consecutive_token_rates", "consecutive"):
        if isinstance(metadata.get(key), (dict, list)):
            return metadata[key]
    return None


def _criterion(name: str, measured: float | None, op: str, target: float, what: str, origin: str = "seed") -> dict[str, Any]:
    """`origin`: "seed" for the seed's three Phase 1 criteria, "project" for one this project added."""
    ok = measured is not None and (measured < target if op == "<" else measured > target if op == ">" else measured >= target)
    return {"name": name, "measured": measured, "op": op, "target": target, "pass": bool(ok), "what": what,
            "origin": origin}


def criteria(overall: dict[str, Any], cfg: ValidationConfig, consistency_overall: float | None) -> list[dict[str, Any]]:
    return [
        _criterion("frequency_entropy_correlation", overall["spearman"]["frequency_vs_mean_entropy"]["rho"], "<",
                   cfg.criterion_rho, "Spearman rho of token frequency vs mean router entropy (all layers pooled)"),
        _criterion("low_entropy_share", overall["entropy"]["share_tokens_below_0.5"], ">",
                   cfg.criterion_low_entropy_share, "share of (layer, token) rows with mean entropy < 0.5 nats"),
        _criterion("fast_path_coverage", overall["coverage"]["entropy_rule"], ">", cfg.criterion_coverage,
                   f"share of occurrences whose token has frequency >= {cfg.fast_path_min_frequency} and mean "
                   f"entropy < {cfg.fast_path_max_entropy} nats"),
        _criterion("top_n_consistency", consistency_overall, ">=", cfg.criterion_consistency,
                   f"mean top-1 consistency of the {cfg.top_n_consistency} most frequent tokens, averaged over layers",
                   origin="project"),
    ]


def hypotheses(rep: dict[str, Any]) -> list[dict[str, str]]:
    """A plain sentence per hypothesis, from the criteria and the bias-controlled checks."""
    crit = {c["name"]: c for c in rep["criteria"]}
    ov = rep["overall"]
    eq_key = next(k for k in ov["spearman"] if "equal_n" in k)
    eq = ov["spearman"][eq_key]
    out = []
    c = crit["frequency_entropy_correlation"]
    rho_eq = eq["rho"]
    extra = (f" At equal sample size (n={rep['config']['equal_n']}) the top-1 entropy correlation is "
             f"rho={rho_eq:.3f}." if rho_eq is not None else " Too few tokens reach the equal sample size to check bias.")
    out.append({"hypothesis": "H1: frequent tokens route more deterministically",
                "verdict": "supported" if c["pass"] else "not supported",
                "sentence": f"{'Supported' if c['pass'] else 'Not supported'}: rho(frequency, mean entropy) = "
                            f"{_fmt(c['measured'])} against the {c['op']} {c['target']} criterion." + extra})
    c = crit["low_entropy_share"]
    conf = ov["confidence"]["quantiles_over_tokens"]["p50"]
    out.append({"hypothesis": "H2: many tokens route with low entropy",
                "verdict": "supported" if c["pass"] else "not supported",
                "sentence": f"{'Supported' if c['pass'] else 'Not supported'}: {_pct(c['measured'])} of tokens have "
                            f"mean entropy < 0.5 nats (max ln E = {ov['entropy']['max_entropy_nats']:.3f}); the median "
                            f"token's mean top-1 probability is {_fmt(conf)}."})
    c = crit["fast_path_coverage"]
    out.append({"hypothesis": "H3a: a token fast path covers a large share of traffic",
                "verdict": "supported" if c["pass"] else "not supported",
                "sentence": f"{'Supported' if c['pass'] else 'Not supported'}: the entropy rule covers "
                            f"{_pct(c['measured'])} of occurrences; the consistency rule (>= "
                            f"{rep['config']['fast_path_min_consistency']}) covers {_pct(ov['coverage']['consistency_rule'])}."})
    c = crit["top_n_consistency"]
    out.append({"hypothesis": "H4: frequent tokens keep their top-1 expert",
                "verdict": "supported" if c["pass"] else "not supported",
                "sentence": f"{'Supported' if c['pass'] else 'Not supported'}: the most frequent tokens keep their "
                            f"modal top-1 expert {_pct(c['measured'])} of the time on average (a token seen once is trivially "
                            f"consistent; the least frequent of the top-N per layer was seen "
                            f"{min(rep['layers'][l]['top_n_consistency']['min_frequency'] for l in rep['layers'])} times)."})
    if rep.get("heldout"):
        out.extend(heldout_hypotheses(rep["heldout"]))
    return out


def heldout_hypotheses(heldout: dict[str, Any]) -> list[dict[str, str]]:
    summ = heldout.get("summary", {})
    tr, ct = summ.get("trained", {}), summ.get("control", {})
    out = []
    tok = tr.get("token_table", {}).get("exact")
    glob = tr.get("global_set", {}).get("exact")
    ctrl = ct.get("token_table", {}).get("exact")
    if tok is not None and glob is not None:
        beat_ctrl = ctrl is None or tok > ctrl
        ok = tok > glob and beat_ctrl
        ctrl_txt = f", the random-init control's token table {_pct(ctrl)}" if ctrl is not None else " (no control run)"
        out.append({"hypothesis": "H5: the token predicts its route on held-out text, beyond an untrained router",
                    "verdict": "supported" if ok else "not supported",
                    "sentence": f"{'Supported' if ok else 'Not supported'}: on the test split the token table matches the "
                                f"exact top-k set {_pct(tok)} of the time (single most frequent set {_pct(glob)}"
                                f"{ctrl_txt})."})
    pair = tr.get("pair_table", {}).get("exact")
    if pair is not None and tok is not None:
        ok = pair > tok
        hit = next((r.get("table_hit") for r in heldout["rows"]
                    if r["model"] == "trained" and r["layer"] == "all" and r["predictor"] == "pair_table"), None)
        out.append({"hypothesis": "H3b: the previous token pins the route",
                    "verdict": "supported" if ok else "not supported",
                    "sentence": f"{'Supported' if ok else 'Not supported'}: the (previous, current) table reaches "
                                f"{_pct(pair)} exact matches against {_pct(tok)} for the token table alone "
                                f"({100 * (pair - tok):+.1f} points; the pair table answered {_pct(hit)} of test "
                                f"tokens, the rest fell back to the token table)."})
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def build_report(df: pd.DataFrame, metadata: dict[str, Any], cfg: ValidationConfig | None = None,
                 heldout: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = cfg or ValidationConfig()
    check_stats_frame(df, metadata)
    df = df[df["frequency"] > 0]
    layers = sorted(int(x) for x in df["layer"].unique())
    first = df[df["layer"] == layers[0]]["frequency"].to_numpy()
    rep: dict[str, Any] = {
        "model": metadata.get("model"), "dataset": metadata.get("dataset"), "split": metadata.get("split"),
        "num_experts": int(metadata["num_experts"]), "top_k": metadata.get("top_k"),
        "max_entropy_nats": math.log(int(metadata["num_experts"])),
        "config": json_config(cfg),
        "entropy_bias_method": (
            f"mean router entropy is an average of per-occurrence entropies (unbiased in sample size); the "
            f"empirical top-1 entropy is compared at an equal sample size n={cfg.equal_n} (exact expected plug-in "
            f"entropy of an n-draw hypergeometric subsample of each token's top-1 counts; tokens seen fewer than n "
            f"times excluded), with the Miller-Madow-corrected estimate alongside"),
        "layers": {},
    }
    cons_by_layer = []
    for layer in layers:
        sub = df[df["layer"] == layer]
        sec = section(sub, metadata, cfg, sub["frequency"].to_numpy())
        sec["top_n_consistency"] = top_n_consistency(sub, cfg.top_n_consistency)
        cons_by_layer.append(sec["top_n_consistency"]["mean"])
        rep["layers"][str(layer)] = sec
    rep["overall"] = section(df, metadata, cfg, first)
    cons_overall = _f(np.mean([c for c in cons_by_layer if c is not None])) if cons_by_layer else None
    rep["overall"]["top_n_consistency"] = {"mean_over_layers": cons_overall}
    rep["consecutive_rates"] = consecutive_rates(metadata)
    if heldout is not None:
        # the bulky per-document counts stay in the held-out file; rows keep their intervals
        rep["heldout"] = {k: v for k, v in heldout.items() if k != "per_document"}
    rep["criteria"] = criteria(rep["overall"], cfg, cons_overall)
    rep["hypotheses"] = hypotheses(rep)
    return rep


def json_config(cfg: ValidationConfig) -> dict[str, Any]:
    import json

    return json.loads(cfg.to_json())
