"""Expert predictors: modal tables from a hand-made calibration trace, previous-token shift,
the VAR tables lookup, and precision/recall worked out by hand. Run: `pytest tests/test_offload_predictors.py`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from var_moe.offload import predictors as P
from var_moe.offload.trace import Trace


def trace(ids, seq, experts, e=4, spec=None):
    ex = np.asarray(experts, np.int16)
    return Trace(np.asarray(ids, np.int32), np.asarray(seq, np.int32), ex, e, list(range(ex.shape[1])), None,
                 None if spec is None else np.asarray(spec, np.int16))


def test_token_modal_table_keeps_the_mode_with_enough_evidence():
    # token 5: {0,1} three times, {2,3} once -> modal {0,1}; token 6: {1,2} twice -> under min_count 3
    calib = trace([5, 5, 5, 5, 6, 6], [0] * 6, [[[0, 1]], [[1, 0]], [[0, 1]], [[2, 3]], [[1, 2]], [[2, 1]]])
    tab = P.build_modal_table(calib, "token", min_count=3)
    assert tab.keys[0].tolist() == [5] and tab.counts[0].tolist() == [3]
    test = trace([5, 6, 7], [0, 0, 0], [[[1, 0]], [[1, 2]], [[0, 3]]])
    pred = P.modal_predict(test, tab)
    assert sorted(pred[0, 0].tolist()) == [0, 1]
    assert pred[1, 0].tolist() == [-1, -1] and pred[2, 0].tolist() == [-1, -1]
    tab2 = P.build_modal_table(calib, "token", min_count=2)
    assert sorted(P.modal_predict(test, tab2)[1, 0].tolist()) == [1, 2]


def test_pair_table_keys_on_the_previous_token_within_a_sequence():
    # (3 -> 5) routes {0,1}, (4 -> 5) routes {2,3}; a sequence start has no previous token
    ids = [3, 5, 4, 5, 3, 5, 4, 5]
    seq = [0, 0, 1, 1, 2, 2, 3, 3]
    ex = [[[0, 2]], [[0, 1]], [[0, 2]], [[2, 3]], [[0, 2]], [[1, 0]], [[0, 2]], [[3, 2]]]
    tab = P.build_modal_table(trace(ids, seq, ex), "pair", min_count=2)
    assert len(tab.keys[0]) == 2
    test = trace([3, 5, 4, 5, 5], [0, 0, 1, 1, 2], [[[0, 1]]] * 5)
    pred = P.modal_predict(test, tab)
    assert sorted(pred[1, 0].tolist()) == [0, 1] and sorted(pred[3, 0].tolist()) == [2, 3]
    assert pred[0, 0, 0] == -1 and pred[4, 0, 0] == -1  # sequence starts


def test_prev_token_and_speculative():
    tr = trace([1, 2, 3], [0, 0, 1], [[[0, 1]], [[2, 3]], [[1, 2]]], spec=[[[-1, -1]], [[2, 0]], [[1, 2]]])
    prev = P.prev_token_predict(tr)
    assert prev[0, 0].tolist() == [-1, -1] and prev[1, 0].tolist() == [0, 1] and prev[2, 0].tolist() == [-1, -1]
    assert P.speculative_predict(tr).tolist() == tr.spec_TLK.tolist()


def test_accuracy_by_hand():
    true = np.asarray([[[0, 1]], [[2, 3]], [[0, 3]], [[1, 2]]], np.int16)
    pred = np.asarray([[[0, 1]], [[2, 0]], [[-1, -1]], [[3, 0]]], np.int16)
    acc = P.accuracy(pred, true)
    assert acc["coverage"] == [0.75]
    assert acc["precision"] == [pytest.approx(3 / 6)]  # hits 2 + 1 + 0 of 6 predicted
    assert acc["recall_covered"] == [pytest.approx(3 / 6)]
    assert acc["recall_all"] == [pytest.approx(3 / 8)]
    assert acc["exact_covered"] == [pytest.approx(1 / 3)]
    assert math.isnan(P.accuracy(np.full_like(true, -1), true)["precision"][0])


def test_var_lookup_uses_members_only():
    member = np.array([[False, True, False]])
    experts = np.array([[[0, 0], [2, 3], [1, 2]]], np.int16)
    tr = trace([1, 2, 0, -1], [0, 0, 0, 0], [[[2, 3]]] * 4)
    pred = P.var_predict(tr, member, experts)
    assert pred[:, 0].tolist() == [[2, 3], [-1, -1], [-1, -1], [-1, -1]]


def test_reference_tables_load(repo_root):
    path = repo_root / "models" / "reference-moe" / "var" / "var_tables.safetensors"
    member, experts = P.load_table_sets(path, [0, 1, 2, 3], vocab_size=4096, num_experts=8, top_k=2)
    assert member.shape == (4, 4096) and experts.shape == (4, 4096, 2)
    assert member[0].sum() > 0 and experts[member].min() >= 0
    with pytest.raises(ValueError, match="num_experts"):
        P.load_table_sets(path, [0], num_experts=4)


def test_lead_times():
    assert P.lead_layers("var", 3, 32) == 3.0 and P.lead_layers("speculative", 3, 32) == 1.0
    assert math.isnan(P.lead_layers("speculative", 0, 32)) and P.lead_layers("prev_token", 0, 32) == 32.0


def test_pair_tables_come_from_the_artifact(repo_root):
    """The artifact's (prev * V + token) keys are re-keyed: a hand-made trace holding one stored pair
    (and the same token after another previous token) gets the stored set only for that pair."""
    from var_moe.var.tables import VARTables

    path = repo_root / "models" / "reference-moe" / "var" / "var_tables.safetensors"
    stored = VARTables.load(path)
    assert stored.pairs, "the committed tables are expected to hold pair tables"
    keys_P, sets_PK, _ = stored.pairs[2]
    prev, tok = divmod(int(keys_P[100]), 4096)
    other = next(p for p in range(4096) if p != prev and p * 4096 + tok not in set(keys_P.tolist()))
    ids = [prev, tok, other, tok]
    ex = np.zeros((4, 4, 2), np.int16)
    tr = Trace(np.asarray(ids, np.int32), np.zeros(4, np.int32), ex, 8, [0, 1, 2, 3], metadata={"vocab_size": 4096})
    info: dict = {}
    preds = P.all_predictions(tr, path, info=info)
    assert "tables artifact" in info["var_pair_source"]
    assert sorted(preds["var_pair"][1, 2].tolist()) == sorted(sets_PK[100].tolist())
    assert preds["var_pair"][3, 2].tolist() == [-1, -1] and preds["var_pair"][0, 2].tolist() == [-1, -1]
    table = P.load_pair_table(path, [0, 1, 2, 3], 8, 2)
    assert [len(k) for k in table.keys] == [len(stored.pairs[l][0]) for l in range(4)]
    with pytest.raises(ValueError, match="num_experts"):
        P.load_pair_table(path, [0], 4, 2)


def test_pair_table_falls_back_to_the_calibration_trace_without_artifact_pairs():
    ids, seq = [3, 5, 3, 5], [0, 0, 1, 1]
    ex = [[[0, 2]], [[0, 1]], [[0, 2]], [[1, 0]]]
    info: dict = {}
    preds = P.all_predictions(trace(ids, seq, ex), None, trace(ids, seq, ex), min_count=2, info=info)
    assert info["var_pair_source"].startswith("calibration trace")
    assert sorted(preds["var_pair"][1, 0].tolist()) == [0, 1]
