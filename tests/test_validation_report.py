"""The hypothesis report on synthetic statistics frames: values against direct pandas/scipy computations,
criteria PASS/FAIL against their thresholds, text rendering. Run: `pytest tests/test_validation_report.py`.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from var_moe.validation.config import ValidationConfig
from var_moe.validation.render import render_text
from var_moe.validation.report import build_report

E = 4


def synthetic_stats(seed=0, vocab=300, layers=(0, 1), sharp=True):
    """Zipf-distributed tokens; frequent tokens route sharply when `sharp`, uniformly otherwise."""
    rng = np.random.default_rng(seed)
    rows = []
    freq = np.maximum(1, np.round(5000 / np.arange(1, vocab + 1) ** 1.1)).astype(int)
    for layer in layers:
        for t in range(vocab):
            f = int(freq[t])
            conc = (1.0 - t / vocab) if sharp else 0.0  # probability mass on the token's expert
            p = np.full(E, (1 - conc) / E)
            p[t % E] += conc
            c1 = rng.multinomial(f, p)
            ent = float(-(p * np.log(np.maximum(p, 1e-12))).sum() + rng.normal(0, 0.01))
            rows.append(dict(layer=layer, token_id=t, token_str=f"t{t}", frequency=f, mean_entropy=max(ent, 0.0),
                             std_entropy=0.01, mean_confidence=float(p.max()), std_confidence=0.01,
                             mean_margin=float(np.sort(p)[-1] - np.sort(p)[-2]),
                             expert_ids=np.nonzero(c1)[0].tolist(), top1_counts=c1[c1 > 0].tolist(),
                             routing_consistency=float(c1.max() / f)))
    meta = {"num_experts": E, "top_k": 2, "model": "synthetic", "max_entropy_nats": math.log(E),
            "consecutive": {"0": {"same_top1_rate": 0.3, "top1_in_prev_top2_rate": 0.5}}}
    return pd.DataFrame(rows), meta


CFG = ValidationConfig(n_boot=50, equal_n=5, top_n_consistency=100, fast_path_min_frequency=5)


def test_report_values_match_direct_computation():
    df, meta = synthetic_stats()
    rep = build_report(df, meta, CFG)
    ov = rep["overall"]
    rho = sps.spearmanr(df["frequency"], df["mean_entropy"]).statistic
    assert ov["spearman"]["frequency_vs_mean_entropy"]["rho"] == pytest.approx(rho)
    assert ov["entropy"]["share_tokens_below_0.5"] == pytest.approx((df["mean_entropy"] < 0.5).mean())
    w = df["frequency"]
    assert ov["entropy"]["share_occurrences_below_0.5"] == pytest.approx(w[df["mean_entropy"] < 0.5].sum() / w.sum())
    cov = w[(w >= 5) & (df["mean_entropy"] < 0.5)].sum() / w.sum()
    assert ov["coverage"]["entropy_rule"] == pytest.approx(cov)
    cov_c = w[(w >= 5) & (df["routing_consistency"] >= 0.9)].sum() / w.sum()
    assert ov["coverage"]["consistency_rule"] == pytest.approx(cov_c)
    per_layer = [df[df.layer == l].nlargest(100, "frequency")["routing_consistency"].mean() for l in (0, 1)]
    assert rep["layers"]["0"]["top_n_consistency"]["mean"] == pytest.approx(per_layer[0])
    assert ov["top_n_consistency"]["mean_over_layers"] == pytest.approx(np.mean(per_layer))
    assert rep["max_entropy_nats"] == pytest.approx(math.log(E))
    assert rep["layers"]["0"]["zipf"]["slope"] == pytest.approx(-1.1, abs=0.15)
    json.dumps(rep)  # JSON-ready (NaN turned into None)


def test_criteria_follow_their_thresholds():
    df, meta = synthetic_stats(sharp=True)
    rep = build_report(df, meta, CFG)
    for c in rep["criteria"]:
        m, t = c["measured"], c["target"]
        want = {"<": m < t, ">": m > t, ">=": m >= t}[c["op"]]
        assert c["pass"] == want, c
    flat = build_report(*synthetic_stats(sharp=False), CFG)
    by = {c["name"]: c for c in flat["criteria"]}
    assert not by["low_entropy_share"]["pass"]  # uniform routing: no token below 0.5 nats
    assert not by["fast_path_coverage"]["pass"]
    assert all(h["verdict"] == "not supported" for h in flat["hypotheses"][1:3])


def test_render_text_states_max_entropy_and_every_criterion():
    df, meta = synthetic_stats()
    rep = build_report(df, meta, CFG)
    text = render_text(rep)
    assert f"{math.log(E):.4f}" in text
    for c in rep["criteria"]:
        assert c["name"] in text
    assert "equal sample size" in text
    assert "H1:" in text and "H4:" in text


def test_bad_frames_get_clear_errors():
    df, meta = synthetic_stats(vocab=20)
    with pytest.raises(ValueError, match="lacks columns"):
        build_report(df.drop(columns=["mean_entropy"]), meta, CFG)
    with pytest.raises(ValueError, match="num_experts"):
        build_report(df, {}, CFG)


def test_heldout_seed_table_shows_intervals_and_the_seed_spread():
    from var_moe.validation.render import heldout_seed_table

    def run(ctrl):
        return {"rows": [{"model": "trained", "layer": 0, "predictor": "token_table", "exact": 0.9,
                          "exact_ci95": [0.88, 0.92], "exact_margin_ci95": [0.35, 0.45]},
                         {"model": "control", "layer": 0, "predictor": "token_table", "exact": ctrl,
                          "exact_ci95": [ctrl - 0.05, ctrl + 0.05]}]}

    text = heldout_seed_table({0: run(0.5), 1: run(0.6), 2: run(0.4)})
    row = [line for line in text.splitlines() if line.startswith("| 0 |")][0]
    assert "90.0% [88.0, 92.0]" in row and "50.0% [45.0, 55.0]" in row and "+40.0 [+35.0, +45.0]" in row
    assert "50.0% / 60.0% / 40.0%" in row and "50.0% ± 10.0" in row and "+30.0 to +50.0" in row
