"""Plain-text rendering of the hypothesis report dict (see report.py) and of the held-out table.

`render_text(report) -> str`; `heldout_table(heldout) -> str` (also used by docs);
`heldout_seed_table({control seed: heldout})`, the Phase 1 headline with intervals and the control's
spread over seeds. No statistics are computed here beyond that spread (mean, sd and range of a few
numbers). Test: `pytest tests/test_validation_report.py`.
"""

from __future__ import annotations

from typing import Any


def _n(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _p(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _sp(s: dict[str, Any]) -> str:
    lo, hi = s["ci95"]
    return f"rho={_n(s['rho'])} (p={_n(s['p_value'], '.2g')}, 95% CI [{_n(lo)}, {_n(hi)}], n={s['n']})"


def _section(name: str, sec: dict[str, Any]) -> list[str]:
    e, c, m = sec["entropy"], sec["confidence"], sec["margin"]
    eq = sec["top1_entropy_equal_n"]
    lines = [f"== {name} ==",
             f"tokens: {sec['num_tokens']}  occurrences: {sec['num_occurrences']}",
             f"Zipf fit: slope={_n(sec['zipf']['slope'])}  R^2={_n(sec['zipf']['r_squared'])}"]
    for key, s in sec["spearman"].items():
        lines.append(f"Spearman {key.replace('_', ' ')}: {_sp(s)}")
    lines += [
        f"mean router entropy (nats, max ln E = {e['max_entropy_nats']:.4f}): tokens < 0.5: "
        f"{_p(e['share_tokens_below_0.5'])}, < 1.0: {_p(e['share_tokens_below_1.0'])}; occurrences < 0.5: "
        f"{_p(e['share_occurrences_below_0.5'])}, < 1.0: {_p(e['share_occurrences_below_1.0'])}; median token "
        f"{_n(e['quantiles_over_tokens']['p50'])}",
        f"top-1 entropy at equal n={eq['n']} ({eq['tokens_with_enough_samples']} tokens): median "
        f"{_n(eq['quantiles_over_tokens']['p50'])}, share < 0.5: {_p(eq['share_tokens_below_0.5'])}",
        f"top-1 probability: token median {_n(c['quantiles_over_tokens']['p50'])} (p10 "
        f"{_n(c['quantiles_over_tokens']['p10'])}, p90 {_n(c['quantiles_over_tokens']['p90'])}); occurrences whose "
        f"token mean > 0.5: {_p(c['share_occurrences_token_mean_above_0.5'])}, > 0.9: "
        f"{_p(c['share_occurrences_token_mean_above_0.9'])}",
        f"top-1 minus top-2 margin: token median {_n(m['quantiles_over_tokens']['p50'])}, occurrence median "
        f"{_n(m['quantiles_over_occurrences']['p50'])}",
        f"top-1 consistency (occurrence-weighted): {_p(sec['consistency_weighted_by_occurrences'])}",
    ]
    t = sec.get("top_n_consistency", {})
    if "mean" in t:
        lines.append(f"top-{t['n']} tokens: mean consistency {_p(t['mean'])} (occurrence-weighted "
                     f"{_p(t['occurrence_weighted_mean'])}; least frequent of them seen {t['min_frequency']} times)")
    elif "mean_over_layers" in t:
        lines.append(f"top-N consistency, mean over layers: {_p(t['mean_over_layers'])}")
    cov = sec["coverage"]
    lines.append(f"fast-path coverage of occurrences: entropy rule {_p(cov['entropy_rule'])}, consistency rule "
                 f"{_p(cov['consistency_rule'])}")
    return lines + [""]


def heldout_table(heldout: dict[str, Any], metric: str = "exact", predictors: list[str] | None = None) -> str:
    """Markdown table: one row per layer, trained vs control per predictor (metric: exact|top1|overlap)."""
    rows = heldout["rows"]
    preds = predictors or heldout["predictors"]
    models = [m for m in ("trained", "control") if any(r["model"] == m for r in rows)]
    layers = sorted({r["layer"] for r in rows if r["layer"] != "all"}, key=int) + ["all"]
    head = ["layer"] + [f"{p} ({m})" for p in preds for m in models]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    idx = {(r["model"], str(r["layer"]), r["predictor"]): r for r in rows}
    for layer in layers:
        cells = [str(layer)]
        for p in preds:
            for m in models:
                r = idx.get((m, str(layer), p))
                cells.append(_p(r[metric]) if r else "n/a")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


EXACT_SETS_SHOWN = 10_000  # exact set agreement is reported where C(E, k) is at most this


def _sets(heldout: dict[str, Any]) -> int:
    from math import comb

    return comb(int(heldout["num_experts"]), int(heldout["top_k"]))


def _few_sets(heldout: dict[str, Any]) -> bool:
    return "num_experts" not in heldout or "top_k" not in heldout or _sets(heldout) <= EXACT_SETS_SHOWN


def heldout_margin_table(heldout: dict[str, Any], metric: str = "exact", predictors: list[str] | None = None) -> str:
    """Markdown table: per layer and predictor, "trained / control (margin in points)"."""
    preds = predictors or heldout["predictors"]
    idx = {(r["model"], str(r["layer"]), r["predictor"]): r[metric] for r in heldout["rows"]}
    layers = sorted({str(r["layer"]) for r in heldout["rows"] if r["layer"] != "all"}, key=int) + ["all"]
    out = ["| layer | " + " | ".join(preds) + " |", "|" + "---|" * (len(preds) + 1)]
    for layer in layers:
        cells = []
        for p in preds:
            t, c = idx.get(("trained", layer, p)), idx.get(("control", layer, p))
            if t is None:
                cells.append("n/a")
            elif c is None:
                cells.append(_p(t))
            else:
                cells.append(f"{_p(t)} / {_p(c)} ({100 * (t - c):+.1f})")
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def render_text(rep: dict[str, Any]) -> str:
    lines = [
        "var-moe Phase 1 hypothesis report",
        f"model: {rep.get('model')}  dataset: {rep.get('dataset')}  split: {rep.get('split')}",
        f"experts E={rep['num_experts']}  top-k={rep.get('top_k')}  entropies in nats, maximum ln E = "
        f"{rep['max_entropy_nats']:.4f}",
        f"entropy bias handling: {rep['entropy_bias_method']}",
        f"config: {rep['config']}",
        "",
    ]
    for layer, sec in rep["layers"].items():
        lines += _section(f"layer {layer}", sec)
    lines += _section("overall (all layers pooled)", rep["overall"])
    if rep.get("consecutive_rates") is not None:
        lines += ["== consecutive-token same-expert rates (per layer) ==", str(rep["consecutive_rates"]), ""]
    if rep.get("heldout"):
        h = rep["heldout"]
        lines += ["== held-out predictability (tables from the calibration split, scored on the test split) ==",
                  f"test tokens: {h.get('num_tokens_test')}  calibration tokens: {h.get('num_tokens_calibration')}",
                  "cells: trained / random-init control (trained minus control, points)",
                  *(["exact top-k set match:", heldout_margin_table(h, "exact"), ""] if _few_sets(h) else
                    [f"exact top-k set match: not shown, C(E, k) = {_sets(h):,} possible sets (rows keep it)", ""]),
                  "top-1 hit:", heldout_margin_table(h, "top1"), "",
                  "mean overlap at k (= pooled expert recall):", heldout_margin_table(h, "overlap"), ""]
        if any("precision" in r for r in h["rows"]):
            lines += ["expert precision (pooled over tokens):", heldout_margin_table(h, "precision"), "",
                      "share of routing weight on predicted experts:", heldout_margin_table(h, "weight"), "",
                      "per-expert precision, mean over experts:", heldout_margin_table(h, "expert_precision_macro"), "",
                      "per-expert recall, mean over experts:", heldout_margin_table(h, "expert_recall_macro"), ""]
        for k, v in h.get("definitions", {}).items():
            lines.append(f"  {k}: {v}")
        lines.append("")
    lines.append("== success criteria (the seed's three; [project] marks one this project added) ==")
    for c in rep["criteria"]:
        tag = " [project]" if c.get("origin") == "project" else ""
        lines.append(f"[{'PASS' if c['pass'] else 'FAIL'}]{tag} {c['name']}: measured {_n(c['measured'], '.4f')} "
                     f"(target {c['op']} {c['target']}) - {c['what']}")
    lines += ["", "== hypotheses =="]
    for h in rep["hypotheses"]:
        lines.append(f"{h['hypothesis']}: {h['sentence']}")
    return "\n".join(lines) + "\n"


def _pci(x: float, ci: list[float] | None) -> str:
    return _p(x) if not ci else f"{_p(x)} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def heldout_seed_table(heldouts: dict[int, dict[str, Any]], predictor: str = "token_table", metric: str = "exact") -> str:
    """Markdown headline: per layer, the trained model and the control of the first seed with their
    95% document-bootstrap intervals, the paired margin with its interval, and the control's spread
    over all the given runs (control seed -> `varmoe predictability` report: min-max, mean +- sd)."""
    seeds = sorted(heldouts)
    idx = {(s, r["model"], str(r["layer"])): r for s in seeds for r in heldouts[s]["rows"] if r["predictor"] == predictor}
    layers = sorted({k[2] for k in idx if k[2] != "all"}, key=int) + ["all"]
    head = "/".join(str(s) for s in seeds)
    out = [f"| layer | trained [95% CI] | control seed {seeds[0]} [95% CI] | margin [95% CI] | "
           f"control seeds {head} | control mean ± sd | margin over seeds |", "|---|---|---|---|---|---|---|"]
    for layer in layers:
        t, c = idx.get((seeds[0], "trained", layer)), idx.get((seeds[0], "control", layer))
        if t is None or c is None:
            continue
        ctrl = [idx[(s, "control", layer)][metric] for s in seeds if (s, "control", layer) in idx]
        m_ci = t.get(f"{metric}_margin_ci95")
        margin = f"{100 * (t[metric] - c[metric]):+.1f}" + (f" [{100 * m_ci[0]:+.1f}, {100 * m_ci[1]:+.1f}]" if m_ci else "")
        sd = float(_sample_sd(ctrl))
        out.append(f"| {layer} | {_pci(t[metric], t.get(f'{metric}_ci95'))} | {_pci(c[metric], c.get(f'{metric}_ci95'))} | "
                   f"{margin} | {' / '.join(_p(v) for v in ctrl)} | {_p(sum(ctrl) / len(ctrl))} ± {100 * sd:.1f} | "
                   f"{100 * (t[metric] - max(ctrl)):+.1f} to {100 * (t[metric] - min(ctrl)):+.1f} |")
    return "\n".join(out)


def _sample_sd(values: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
