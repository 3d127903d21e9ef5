"""Held-out agreement of the rows a VAR table serves, with a bootstrap interval over documents.

`served_agreement(tables, test_evidence)` scores a `VARTables` artifact against routing evidence
collected on the test split (`var.evidence.collect_evidence`, the unmodified model's own
decisions): per layer, the share of valid test tokens the table serves (coverage) and the share
of those whose learned top-k set equals the table's set exactly (agreement), each with a 95%
percentile interval from resampling test documents with replacement (documents, not tokens, are
the independent units). Vectorised: per (layer, document) sums with `np.bincount`, resamples as
one matrix. `score_served` scores any per-row served / agreeing masks the same way (e.g. token plus
(previous, token) entries, `analysis_jobs/pair_coverage.py`). Test: `pytest tests/test_var_pairs.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..capture.router_math import set_codes
from ..var.evidence import Evidence
from .bootstrap import document_resamples, ratio_ci95


def served_agreement(tables: Any, test: Evidence, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    target = (tables.metadata.get("config") or {}).get("target_agreement")
    masks = {}
    for layer in sorted(tables.layers):
        ev = test.layers.get(layer)
        if ev is None:
            continue
        t = tables.layers[layer]
        tok = ev.rows_R4[:, 2]
        code_V = set_codes(t.experts_VK.sort(1).values, ev.num_experts)
        served_R = t.member_V[tok]
        masks[layer] = (ev.rows_R4, ev.counts_R, served_R, served_R & (ev.rows_R4[:, 3] == code_V[tok]), t.size)
    return score_served(masks, target, resamples, seed)


def score_served(masks: dict[int, tuple[Any, ...]], target: float | None, resamples: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
    """Coverage and agreement per layer and overall from per-row masks: layer -> (rows_R4,
    counts_R, served_R, agree_R, table_size) over one test evidence object (rows = its distinct
    (document, previous, token, set) rows); agree_R must imply served_R."""
    out: dict[str, Any] = {"target_agreement": target, "resamples": resamples, "layers": {}}
    pick = None
    tot_all = srv_all = agr_all = None
    for layer, (rows, counts, served_R, agree_R, size) in sorted(masks.items()):
        counts = counts.double()
        docs, inv = np.unique(rows[:, 0].numpy(), return_inverse=True)
        d = len(docs)
        tot_D = np.bincount(inv, weights=counts.numpy(), minlength=d)
        srv_D = np.bincount(inv, weights=(counts * served_R).numpy(), minlength=d)
        agr_D = np.bincount(inv, weights=(counts * agree_R).numpy(), minlength=d)
        if pick is None:
            pick = document_resamples(d, resamples, seed)
            tot_all, srv_all, agr_all = np.zeros(d), np.zeros(d), np.zeros(d)
        n_srv, n_tot = srv_D.sum(), tot_D.sum()
        agreement = float(agr_D.sum() / n_srv) if n_srv else None
        out["layers"][str(layer)] = {
            "served": int(n_srv), "tokens": int(n_tot), "coverage": float(n_srv / max(n_tot, 1)),
            "coverage_ci95": ratio_ci95(srv_D, tot_D, pick), "agreement": agreement,
            "agreement_ci95": ratio_ci95(agr_D, srv_D, pick) if n_srv else None,
            "meets_target": None if agreement is None or target is None else bool(agreement >= target),
            "table_size": int(size), "documents": d,
        }
        tot_all, srv_all, agr_all = tot_all + tot_D, srv_all + srv_D, agr_all + agr_D
    if pick is not None:
        n = srv_all.sum()
        out["overall"] = {"coverage": float(n / max(tot_all.sum(), 1)), "coverage_ci95": ratio_ci95(srv_all, tot_all, pick),
                          "agreement": float(agr_all.sum() / n) if n else None,
                          "agreement_ci95": ratio_ci95(agr_all, srv_all, pick) if n else None}
    out["method"] = ("coverage = served valid test tokens / valid test tokens per (layer); agreement = served rows whose "
                     "learned top-k set equals the table set; 95% percentile intervals resampling test documents")
    return out
