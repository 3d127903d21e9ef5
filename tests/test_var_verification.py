"""Held-out verification of table entries: capped per-document counts and the bound by hand,
the multiplicity rules on hand-picked p-values, and the vectorised builder against a brute-force
construction on a tiny model. Run: `pytest tests/test_var_verification.py`."""

import math

import pytest
import torch

from brute_stats import brute_force_bh, brute_force_candidates, brute_force_occurrences
from var_moe.adapters import get_adapter
from var_moe.tiny import tiny_model
from var_moe.var.config import VARConfig
from var_moe.var.evaluate import EvalBatch
from var_moe.var.evidence import Evidence, LayerEvidence, collect_evidence
from var_moe.var.certify import layer_candidates, multiplicity_levels, score_pvalues, wilson_lower_bound
from var_moe.var.tables import VARTables

torch.set_num_threads(1)
E, K, V = 4, 2, 8


def hand_evidence() -> LayerEvidence:
    """Token 3: docs 0 and 2 (even) choose {0,1}; docs 1, 3, 5 (odd) certify:
    doc 1: 4 occurrences, 3 on {0,1}; doc 3: 1 on {0,1}; doc 5: 2 on {2,3}."""
    ev = LayerEvidence(V, E, K)
    occ = [(0, (0, 1))] * 5 + [(2, (0, 1))] * 2 + [(2, (2, 3))] + [(1, (0, 1))] * 3 + [(1, (1, 2))] + [(3, (0, 1))] + [(5, (2, 3))] * 2
    doc = torch.tensor([d for d, _ in occ])
    idx = torch.tensor([s for _, s in occ])
    n = len(occ)
    ev.add(doc, torch.full((n,), -1), torch.full((n,), 3), idx, torch.full((n, K), 0.5), torch.full((n, E), 0.25))
    ev.consolidate()
    return ev


@pytest.mark.parametrize("cap,agree,total", [(1, 0.75 + 1 + 0, 3.0), (2, 1.5 + 1 + 0, 5.0), (None, 4.0, 7.0)])
def test_capped_certifying_counts_by_hand(cap, agree, total):
    c = layer_candidates(hand_evidence(), VARConfig(frequency_threshold=1, max_per_document=cap, target_agreement=0.5))
    assert set(c.modal_VK[3].tolist()) == {0, 1}
    assert float(c.agree_V[3]) == pytest.approx(agree)
    assert float(c.total_V[3]) == pytest.approx(total)
    assert float(c.docs_V[3]) == 3
    # the Wilson lower bound at 95% (z = 1.96), written out
    z, p = 1.959963984540054, agree / total
    want = (p + z * z / (2 * total) - z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))) / (1 + z * z / total)
    assert float(wilson_lower_bound(c.agree_V[3:4], c.total_V[3:4], z)) == pytest.approx(want, abs=1e-12)
    # score-test p-value of "agreement <= 0.5": 1 - Phi((p - 0.5) / sqrt(0.25 / n))
    zt = (p - 0.5) / math.sqrt(0.25 / total)
    assert float(c.pvalue_V[3]) == pytest.approx(0.5 * math.erfc(zt / math.sqrt(2)), abs=1e-12)


def test_wilson_bound_at_target_iff_score_test_rejects():
    agree, total = torch.tensor([9.0, 30.0, 97.0, 5.0]), torch.tensor([10.0, 31.0, 100.0, 5.0])
    z = 1.959963984540054
    p = score_pvalues(agree, total, 0.8)
    assert torch.equal(wilson_lower_bound(agree, total, z) >= 0.8, p <= 0.025)


def test_multiplicity_rules_on_hand_picked_pvalues():
    p = torch.tensor([0.2, 0.001, 0.03, 0.02], dtype=torch.float64)
    bh, level = multiplicity_levels(p, 0.05, "bh")  # thresholds i * 0.05 / 4: 0.0125 0.025 0.0375 0.05
    assert bh.tolist() == [False, True, True, True] and float(level[0]) == pytest.approx(0.05 * 3 / 4)
    holm, _ = multiplicity_levels(p, 0.05, "holm")  # 0.001 <= 0.0125; 0.02 > 0.05/3 stops
    assert holm.tolist() == [False, True, False, False]
    none, _ = multiplicity_levels(p, 0.05, "none")
    assert none.tolist() == [False, True, True, True]


def batches(seed: int, n: int = 6, b: int = 4, s: int = 24) -> list[EvalBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 9, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.long)
        mask[1, s - 5:] = 0  # padding must not count
        out.append(EvalBatch(ids, mask, [i * b + r for r in range(b)]))
    return out


@pytest.mark.parametrize("cap", [1, 3, None])
def test_builder_equals_brute_force_on_a_tiny_model(cap):
    model = tiny_model("mixtral", seed=3)
    adapter = get_adapter(model)
    data = batches(0, n=10)
    evidence = collect_evidence(model, data, adapter)
    occ = brute_force_occurrences(model, data)
    cfg = VARConfig(frequency_threshold=4, entropy_threshold=1.381, entropy_relative=False, target_agreement=0.75,
                    max_per_document=cap, multiplicity="bh")
    tables = VARTables.from_evidence(evidence, model, adapter, cfg)
    pvals, keys = [], []
    for layer, rows in occ.items():
        ref = brute_force_candidates(rows, cap, 4, 1.381)
        t = tables[layer]
        for tok, r in ref.items():
            assert tuple(sorted(t.experts_VK[tok].tolist())) == r["modal"]
            assert float(t.agree_V[tok]) == pytest.approx(r["agree"])
            assert float(t.total_V[tok]) == pytest.approx(r["total"])
            if r["eligible"]:
                n, p = r["total"], r["agree"] / r["total"]
                pvals.append(0.5 * math.erfc((p - 0.75) / math.sqrt(0.1875 / n) / math.sqrt(2)))
                keys.append((layer, tok))
    # Benjamini-Hochberg by hand over all layers at one-sided alpha 0.025
    m = len(pvals)
    want = brute_force_bh(pvals, keys, 0.025)
    got = {(l, tok) for l, t in tables.layers.items() for tok in torch.nonzero(t.member_V).squeeze(1).tolist()}
    assert got == want and 0 < len(want) < m
    for l, t in tables.layers.items():
        assert bool((t.bound_V[t.member_V] >= 0.75 - 1e-9).all())


def test_evidence_round_trip_and_refusals(tmp_path):
    model = tiny_model("mixtral", seed=3)
    ev = collect_evidence(model, batches(1, n=2), get_adapter(model))
    ev.save(tmp_path / "ev.safetensors")
    back = Evidence.load(tmp_path / "ev.safetensors")
    for l in ev.layers:
        for name in LayerEvidence.TENSORS:
            assert torch.equal(getattr(back.layers[l], name), getattr(ev.layers[l], name))
    other = tiny_model("mixtral", seed=0, num_local_experts=8)
    with pytest.raises(ValueError, match="num_experts"):
        VARTables.from_evidence(back, other, get_adapter(other), VARConfig())
