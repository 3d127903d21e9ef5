"""The perplexity criterion can fail: a deliberately loose table (target 0.5, no multiplicity
correction, no per-document cap) on the reference model raises held-out perplexity by a margin
whose paired bootstrap interval excludes zero, both on back-to-back pieces and on sliding windows
(the perplexity criterion's scoring). Also: the sweep's table stage on a tiny model is
resumable. Run: `pytest tests/test_var_sweep.py`."""

import json

import pytest
import torch

from var_moe.adapters import get_adapter
from var_moe.var.config import VARConfig
from var_moe.var.evaluate import _per_doc, batch_nll, eval_batches, paired_bootstrap, sliding_batches
from var_moe.var.evidence import collect_evidence
from var_moe.var.tables import VARTables
from var_moe.var.wrapper import VARModelWrapper

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loose(reference_model_dir):
    """The reference model with deliberately loose tables from 40 calibration documents."""
    from var_moe.loading import load_model

    model, tok = load_model(reference_model_dir)
    adapter = get_adapter(model)
    calib = eval_batches(tok, "stdlib", "calibration", None, 128, 8, max_per_doc=4, max_docs=40)
    evidence = collect_evidence(model, calib, adapter)
    cfg = VARConfig(target_agreement=0.5, frequency_threshold=3, max_per_document=None, multiplicity="none")
    tables = VARTables.from_evidence(evidence, model, adapter, cfg)
    assert sum(tables.sizes().values()) > 100
    return model, tok, cfg, tables


def degradation(model, cfg, tables, test):
    base = [batch_nll(model, b, torch.device("cpu")) for b in test]
    with VARModelWrapper(model, cfg, tables) as w:
        var = [batch_nll(w, b, torch.device("cpu")) for b in test]
        assert w.get_performance_stats()["overall"]["routing_distribution"]["fast"] > 0.2
    b_nll, b_cnt = _per_doc(test, [r[0] for r in base], [r[1] for r in base])
    v_nll, v_cnt = _per_doc(test, [r[0] for r in var], [r[1] for r in var])
    assert (b_cnt == v_cnt).all() and len(b_cnt) == 40
    return paired_bootstrap(b_nll, b_cnt, v_nll, v_cnt, 1000, 0)


def test_loose_setting_degradation_is_detected(loose):
    model, tok, cfg, tables = loose
    test = eval_batches(tok, "stdlib", "test", None, 128, 8, max_per_doc=2, max_docs=40)
    ppl = degradation(model, cfg, tables, test)
    assert ppl["ci95_pct"][0] > 0, ppl  # the degradation is detected, not hidden in the noise


def test_loose_setting_degradation_is_detected_with_sliding_windows(loose):
    model, tok, cfg, tables = loose
    # the first 3 windows of 128 tokens advancing by 64: 256 scored tokens per document
    test = sliding_batches(tok, "stdlib", "test", 128, 64, 8, max_docs=40, max_windows_per_doc=3)
    assert any(b.score_from_B.max() > 1 for b in test)  # overlapping windows, context positions not scored
    ppl = degradation(model, cfg, tables, test)
    assert ppl["ci95_pct"][0] > 0, ppl


def test_sweep_table_stage_is_resumable(tmp_path):
    from test_var_verification import batches

    from var_moe.tiny import tiny_model
    from var_moe.var.sweep import SweepGrid, sweep_tables

    model = tiny_model("mixtral", seed=3)
    adapter = get_adapter(model)
    cal = collect_evidence(model, batches(0, n=10), adapter)
    test = collect_evidence(model, batches(1, n=4), adapter)
    grid = SweepGrid(targets=(0.5, 0.75), min_frequencies=(4,), entropy_caps=(None,), per_document_caps=(1, None))
    out = tmp_path / "sweep.json"
    lines: list[str] = []
    doc = sweep_tables(cal, test, model, adapter, grid, VARConfig(), out, log=lines.append)
    assert len(doc["tables"]) == 4 and len(lines) == 4
    again = sweep_tables(cal, test, model, adapter, grid, VARConfig(), out, log=lines.append)
    assert len(lines) == 4 and again["tables"] == json.loads(out.read_text())["tables"]
    for row in doc["tables"]:
        for layer in row["layers"].values():
            assert 0 <= layer["coverage"] <= 1
            if layer["served"]:
                lo, hi = layer["agreement_ci95"]
                assert lo <= layer["agreement"] <= hi


def test_sweep_runtime_refuses_to_mix_scorings(tmp_path):
    from var_moe.errors import InvalidInputError
    from var_moe.tiny import tiny_model
    from var_moe.var.sweep import SweepGrid, sweep_runtime

    model = tiny_model("mixtral", seed=3)
    out = tmp_path / "sweep.json"
    stored = {"nll": [1.0], "count": [2.0], "documents": 1, "tokens": 2}
    pieces = {"method": "back-to-back pieces", "window": 8, "stride": 8, "rows": 1, "documents": 1}
    sliding = {**pieces, "method": "sliding windows", "stride": 4}

    def run(scoring):
        return sweep_runtime(None, model, None, [], [], SweepGrid(), VARConfig(), [], out, log=lambda _: None, scoring=scoring)

    out.write_text(json.dumps({"tables": [], "runtime": [], "baseline": stored}))  # written before scorings were recorded
    assert run(pieces)["baseline"] == stored
    with pytest.raises(InvalidInputError, match="mix scorings"):
        run(sliding)
    out.write_text(json.dumps({"tables": [], "runtime": [], "baseline": {**stored, "scoring": sliding}}))
    assert run(sliding)["baseline"]["scoring"] == sliding
    with pytest.raises(InvalidInputError, match="mix scorings"):
        run({**sliding, "documents": 2})
