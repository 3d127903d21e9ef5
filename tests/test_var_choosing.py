"""Choosing table entries on a separate evidence object (e.g. training-split documents) and
certifying them on every document of the calibration evidence: capped counts by hand on a hand-made
input, the vectorised builder against a brute-force construction on a tiny model, the refusals
(test split on either side, the same split on both, evidence that names no split), the metadata
that records both sides, the CLI flag checks and the sweep's refusal to mix schemes in one file.
Run: `pytest tests/test_var_choosing.py`."""

import argparse
import math

import pytest
import torch

from brute_stats import brute_force_bh, brute_force_candidates, brute_force_occurrences
from test_var_verification import batches
from var_moe.adapters import get_adapter
from var_moe.tiny import tiny_model
from var_moe.var.config import VARConfig
from var_moe.var.evidence import Evidence, LayerEvidence, collect_evidence
from var_moe.var.certify import layer_candidates
from var_moe.var.tables import VARTables, spread_indices

torch.set_num_threads(1)
E, K, V = 4, 2, 8


def layer_evidence(occ: list[tuple[int, tuple[int, int]]], token: int = 3) -> LayerEvidence:
    ev = LayerEvidence(V, E, K)
    n = len(occ)
    ev.add(torch.tensor([d for d, _ in occ]), torch.full((n,), -1), torch.full((n,), token),
           torch.tensor([s for _, s in occ]), torch.full((n, K), 0.5), torch.full((n, E), 0.25))
    ev.consolidate()
    return ev


def hand_pair() -> tuple[LayerEvidence, LayerEvidence]:
    """Chooser, token 3: docs 0-2 route it 4x to {2,3} and 3x to {0,1}, so {2,3} is chosen (7 occurrences).
    Certifier, every document certifies: doc 0: 3 occurrences, 2 on {2,3}; doc 1: 1 on {2,3};
    doc 2: 5 on {2,3}; doc 3: 2 on {0,1}."""
    chooser = layer_evidence([(0, (2, 3))] * 2 + [(1, (2, 3))] * 2 + [(2, (0, 1))] * 3)
    cert = layer_evidence([(0, (2, 3))] * 2 + [(0, (0, 1))] + [(1, (2, 3))] + [(2, (2, 3))] * 5 + [(3, (0, 1))] * 2)
    return chooser, cert


@pytest.mark.parametrize("cap,agree,total", [(1, 2 / 3 + 1 + 1 + 0, 4.0), (2, 4 / 3 + 1 + 2 + 0, 7.0), (None, 8.0, 11.0)])
def test_separate_choosing_counts_by_hand(cap, agree, total):
    chooser, cert = hand_pair()
    cfg = VARConfig(frequency_threshold=7, max_per_document=cap, target_agreement=0.5)
    c = layer_candidates(cert, cfg, "separate", chooser)
    assert tuple(sorted(c.modal_VK[3].tolist())) == (2, 3)
    assert float(c.agree_V[3]) == pytest.approx(agree)
    assert float(c.total_V[3]) == pytest.approx(total)
    assert float(c.docs_V[3]) == 4  # even documents certify too
    assert float(c.select_V[3]) == 7 and bool(c.eligible_V[3])  # frequency counted on the chooser
    assert not bool(layer_candidates(cert, cfg.replace(frequency_threshold=8), "separate", chooser).eligible_V[3])
    # the even/odd scheme on the certifying evidence alone chooses and certifies differently:
    # even docs 0, 2 choose {2,3} (7 of 8), odd docs 1, 3 certify (1 agreeing of 3, capped)
    c_even = layer_candidates(cert, cfg.replace(frequency_threshold=1))
    assert float(c_even.docs_V[3]) == 2 and float(c_even.agree_V[3]) == pytest.approx(1.0)


def tiny_pair(model, seed_choose: int = 2, seed_cert: int = 0):
    adapter = get_adapter(model)
    data_c, data_v = batches(seed_choose, n=10), batches(seed_cert, n=10)
    chooser = collect_evidence(model, data_c, adapter, {"dataset": "d", "split": "train"})
    cert = collect_evidence(model, data_v, adapter, {"dataset": "d", "split": "calibration"})
    return chooser, cert, data_c, data_v


@pytest.mark.parametrize("cap", [1, 3, None])
def test_separate_builder_equals_brute_force_on_a_tiny_model(cap):
    model = tiny_model("mixtral", seed=3)
    adapter = get_adapter(model)
    chooser, cert, data_c, data_v = tiny_pair(model)
    occ_c, occ_v = brute_force_occurrences(model, data_c), brute_force_occurrences(model, data_v)
    target = 0.7
    cfg = VARConfig(frequency_threshold=4, entropy_threshold=1.381, entropy_relative=False, target_agreement=target,
                    max_per_document=cap, multiplicity="bh")
    tables = VARTables.from_evidence(cert, model, adapter, cfg, choose_evidence=chooser)
    pvals, keys = [], []
    for layer in occ_v:
        ref = brute_force_candidates(occ_v[layer], cap, 4, 1.381, chooser_occ=occ_c[layer])
        t = tables[layer]
        seen = torch.zeros(t.member_V.numel(), dtype=torch.bool)
        for tok, r in ref.items():
            seen[tok] = True
            assert tuple(sorted(t.experts_VK[tok].tolist())) == r["modal"]
            assert float(t.agree_V[tok]) == pytest.approx(r["agree"])
            assert float(t.total_V[tok]) == pytest.approx(r["total"])
            assert float(t.select_V[tok]) == sum(1 for o in occ_c[layer] if o[2] == tok)
            if r["eligible"]:
                n, p = r["total"], r["agree"] / r["total"]
                pvals.append(0.5 * math.erfc((p - target) / math.sqrt(target * (1 - target) / n) / math.sqrt(2)))
                keys.append((layer, tok))
        assert not bool(t.member_V[~seen].any())  # tokens the chooser never saw are never served
    want = brute_force_bh(pvals, keys, 0.025)
    got = {(l, tok) for l, t in tables.layers.items() for tok in torch.nonzero(t.member_V).squeeze(1).tolist()}
    assert got == want and 0 < len(want) < len(pvals)
    # another chooser gives other tables: the choosing side is really used
    other = VARTables.from_evidence(cert, model, adapter, cfg)
    assert any(not torch.equal(other[l].total_V, tables[l].total_V) for l in tables.layers)


def test_metadata_records_both_sides_and_survives_a_round_trip(tmp_path):
    model = tiny_model("mixtral", seed=3)
    adapter = get_adapter(model)
    chooser, cert, _, _ = tiny_pair(model)
    cfg = VARConfig(frequency_threshold=4, target_agreement=0.6)
    tables = VARTables.from_evidence(cert, model, adapter, cfg, source="cal.st", choose_evidence=chooser,
                                     choose_source="train.st")
    m = VARTables.load(tables.save(tmp_path / "t.safetensors"), model).metadata
    assert m["choosing"] == {"source": "train.st", "dataset": "d", "split": "train", "documents": 40,
                             "tokens": chooser.metadata["num_tokens"],
                             "documents_rule": "all documents of the choosing evidence (train)"}
    assert m["certifying"]["split"] == "calibration" and m["certifying"]["documents"] == 40
    assert "choosing evidence (train)" in m["verification"]["method"]
    even = VARTables.from_evidence(cert, model, adapter, cfg, source="cal.st").metadata
    assert even["choosing"]["documents"] == 20 and even["certifying"]["documents_rule"] == "odd-indexed documents"
    assert even["choosing"]["tokens"] + even["certifying"]["tokens"] == cert.metadata["num_tokens"]


def relabel(ev: Evidence, **meta) -> Evidence:
    return Evidence(ev.layers, {**ev.metadata, **meta})


def test_test_split_same_split_and_unnamed_splits_are_refused():
    model = tiny_model("mixtral", seed=3)
    adapter = get_adapter(model)
    chooser, cert, _, _ = tiny_pair(model)
    cfg = VARConfig(frequency_threshold=4)
    with pytest.raises(ValueError, match="allow-test-split"):
        VARTables.from_evidence(cert, model, adapter, cfg, choose_evidence=relabel(chooser, split="test"))
    with pytest.raises(ValueError, match="allow-test-split"):
        VARTables.from_evidence(relabel(cert, split="test"), model, adapter, cfg, choose_evidence=chooser)
    with pytest.raises(ValueError, match="allow-test-split"):  # the even/odd scheme refuses test evidence too
        VARTables.from_evidence(relabel(cert, split="test"), model, adapter, cfg)
    VARTables.from_evidence(cert, model, adapter, cfg, choose_evidence=relabel(chooser, split="test"), allow_test_split=True)
    with pytest.raises(ValueError, match="not be held out"):
        VARTables.from_evidence(cert, model, adapter, cfg, choose_evidence=relabel(chooser, split="calibration"))
    with pytest.raises(ValueError, match="name their split"):
        VARTables.from_evidence(cert, model, adapter, cfg, choose_evidence=relabel(chooser, split=None))
    with pytest.raises(ValueError, match="router weights"):
        VARTables.from_evidence(cert, model, adapter, cfg, choose_evidence=relabel(chooser, router_fingerprint="0" * 16))
    with pytest.raises(ValueError, match="choose="):
        VARTables.from_evidence(cert, model, adapter, cfg, choose="all", choose_evidence=chooser)


def test_cli_flag_checks_come_before_the_model():
    from var_moe.commands._var import check_choose_flags

    meta = {"dataset": "stdlib", "split": "calibration", "config": {"max_length": 256}}

    def args(**kw):
        return argparse.Namespace(**({"choose_evidence": None, "choose_split": None, "choose_max_docs": None} | kw))

    check_choose_flags(args(), meta)
    check_choose_flags(args(choose_evidence="t.st"), meta)
    with pytest.raises(ValueError, match="--choose-split"):
        check_choose_flags(args(choose_evidence="t.st", choose_split="test"), meta)
    with pytest.raises(ValueError, match="--choose-split 'calibration'"):
        check_choose_flags(args(choose_evidence="t.st", choose_split="calibration"), meta)
    with pytest.raises(ValueError, match="need --choose-evidence"):
        check_choose_flags(args(choose_max_docs=10), meta)
    with pytest.raises(ValueError, match="--choose-max-docs"):
        check_choose_flags(args(choose_evidence="t.st", choose_max_docs=0), meta)


def test_spread_indices_cover_the_split_evenly():
    assert spread_indices(5, None) == [0, 1, 2, 3, 4] and spread_indices(5, 9) == [0, 1, 2, 3, 4]
    got = spread_indices(1000, 4)
    assert got == [0, 333, 666, 999]
    assert len(spread_indices(1543, 600)) == 600


def test_sweep_records_the_scheme_and_refuses_to_mix_them(tmp_path):
    from var_moe.var.sweep import SweepGrid, sweep_tables

    model = tiny_model("mixtral", seed=3)
    adapter = get_adapter(model)
    chooser, cert, _, _ = tiny_pair(model)
    test = collect_evidence(model, batches(1, n=4), adapter)
    grid = SweepGrid(targets=(0.6,), min_frequencies=(4,), entropy_caps=(None,), per_document_caps=(None,))
    out = tmp_path / "sweep.json"
    doc = sweep_tables(cert, test, model, adapter, grid, VARConfig(), out, log=lambda _: None, chooser=chooser)
    assert doc["choosing"].startswith("d/train: 40 documents")
    with pytest.raises(ValueError, match="another --output"):
        sweep_tables(cert, test, model, adapter, grid, VARConfig(), out, log=lambda _: None)
