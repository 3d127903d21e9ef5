"""Held-out predictability equals a brute-force pure-Python scorer on a tiny random model.

The reference below records every router decision with its own hook, then builds the tables with
Counters and replays an LRU list position by position: nothing shared with the library except
the recorder. The document-bootstrap intervals are checked the same way: per-document hits from the
brute-force scorer, resampled in a Python loop. Run: `pytest tests/test_validation_predictability.py`.
"""

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from var_moe.capture.recorder import RoutingRecorder
from var_moe.tiny import tiny_model
from var_moe.validation.bootstrap import document_resamples, ratio_ci95
from var_moe.var.evaluate import EvalBatch
from var_moe.validation.predictability import (
    PREDICTORS,
    PredictabilityConfig,
    heldout_predictability,
    random_init_control,
)

torch.set_num_threads(1)


def _batches(seed, n, vocab_hi=20, pad_rows=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab_hi, (3, 10), generator=g)
        mask = torch.ones_like(ids)
        if pad_rows:  # padding on the right of one row, on the left of another
            mask[1, 7:] = 0
            ids[1, 7:] = 0
            mask[2, :2] = 0
            ids[2, :2] = 0
        out.append((ids, mask))
    return out


def _record(model, batches):
    """[(layer, [ (token, [(expert, weight) ...]) per valid position ] per sequence)]."""
    seqs = defaultdict(list)

    def cb(layer, tokens, decision):
        b, s = tokens.batch_size, tokens.seq_len
        ids = tokens.ids_T.reshape(b, s).tolist()
        valid = tokens.valid_T.reshape(b, s).tolist()
        idx = decision.topk_idx_TK.reshape(b, s, -1).tolist()
        w = decision.topk_w_TK.reshape(b, s, -1).tolist()
        for r in range(b):
            seqs[layer].append([(ids[r][p], list(zip(idx[r][p], w[r][p]))) for p in range(s) if valid[r][p]])

    with RoutingRecorder(model, cb), torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return seqs


def _modal(counter):
    best = max(counter.values())
    return min(s for s, c in counter.items() if c == best)


def _brute(model, calib, test, min_pair_count, per_seq=None):
    """Rates per (layer, predictor); fills `per_seq[(layer, predictor)]` with [exact hits, tokens] per test sequence."""
    cal, tst = _record(model, calib), _record(model, test)
    k = model.config.num_experts_per_tok
    result = {}
    for layer in cal:
        tok, pair, glob = defaultdict(Counter), defaultdict(Counter), Counter()
        for seq in cal[layer]:
            prev = None
            for t, chosen in seq:
                s = tuple(sorted(e for e, _ in chosen))
                tok[t][s] += 1
                glob[s] += 1
                if prev is not None:
                    pair[(prev, t)][s] += 1
                prev = t
        g = _modal(glob)
        sums = {p: [0.0, 0.0, 0.0] for p in PREDICTORS}
        extra = {p: {"tp": 0, "predicted": 0, "weight": 0.0, "expert": defaultdict(lambda: [0, 0, 0])} for p in PREDICTORS}
        n = 0
        for seq in tst[layer]:
            prev = None
            lru = []  # most recent last
            if per_seq is not None:
                for name in PREDICTORS:
                    per_seq.setdefault((layer, name), []).append([0.0, 0])
            for t, chosen in seq:
                truth = set(e for e, _ in chosen)
                top1 = max(chosen, key=lambda x: x[1])[0]
                tp = _modal(tok[t]) if t in tok else g
                if prev is not None and (prev, t) in pair and sum(pair[(prev, t)].values()) >= min_pair_count:
                    pp = _modal(pair[(prev, t)])
                else:
                    pp = tp
                preds = {"token_table": set(tp), "pair_table": set(pp), "global_set": set(g),
                         "lru_k": set(lru[-k:]), "lru_2k": set(lru[-2 * k:])}
                for name, p in preds.items():
                    sums[name][0] += float(truth <= p) if name.startswith("lru") else float(truth == p)
                    sums[name][1] += float(top1 in p)
                    sums[name][2] += len(truth & p) / k
                    x = extra[name]
                    x["tp"] += len(truth & p)
                    x["predicted"] += len(p)
                    x["weight"] += sum(w for e, w in chosen if e in p) / sum(w for _, w in chosen)
                    for e in p:
                        x["expert"][e][1] += 1
                        x["expert"][e][0] += e in truth
                    for e in truth:
                        x["expert"][e][2] += 1
                    if per_seq is not None:
                        per_seq[(layer, name)][-1][0] += float(truth <= p) if name.startswith("lru") else float(truth == p)
                        per_seq[(layer, name)][-1][1] += 1
                n += 1
                for e, _ in sorted(chosen, key=lambda x: x[1]):  # highest weight becomes most recent
                    if e in lru:
                        lru.remove(e)
                    lru.append(e)
                prev = t
        result[layer] = {}
        for name, vals in sums.items():
            x = extra[name]
            ex = x["expert"].values()
            result[layer][name] = [v / n for v in vals] + [
                x["tp"] / x["predicted"] if x["predicted"] else float("nan"), x["tp"] / (n * k), x["weight"] / n,
                float(np.mean([tp / pr for tp, pr, _ in ex if pr])), float(np.mean([tp / ch for tp, _, ch in ex if ch]))]
    return result


@pytest.mark.parametrize("min_pair_count,experts", [(1, 4), (2, 4), (2, 8)])
def test_heldout_matches_brute_force(min_pair_count, experts):
    # with 8 experts a 2k = 4 cache holds only some of the used experts, so LRU order matters
    model = tiny_model("mixtral", seed=3, num_local_experts=experts)
    calib, test = _batches(0, 6), _batches(1, 3)
    got = heldout_predictability(model, calib, test, PredictabilityConfig(min_pair_count=min_pair_count))
    ref = _brute(model, calib, test, min_pair_count)
    rows = {(r["layer"], r["predictor"]): r for r in got["rows"] if r["model"] == "trained"}
    for layer, preds in ref.items():
        for name, (exact, top1, overlap, precision, recall, weight, e_prec, e_rec) in preds.items():
            r = rows[(layer, name)]
            assert r["exact"] == pytest.approx(exact, abs=1e-9), (layer, name)
            assert r["top1"] == pytest.approx(top1, abs=1e-9), (layer, name)
            assert r["overlap"] == pytest.approx(overlap, abs=1e-9), (layer, name)
            assert r["precision"] == pytest.approx(precision, abs=1e-9), (layer, name)
            assert r["recall"] == pytest.approx(recall, abs=1e-9) and recall == pytest.approx(overlap), (layer, name)
            assert r["weight"] == pytest.approx(weight, abs=1e-6), (layer, name)
            assert r["expert_precision_macro"] == pytest.approx(e_prec, abs=1e-9), (layer, name)
            assert r["expert_recall_macro"] == pytest.approx(e_rec, abs=1e-9), (layer, name)
    assert got["num_tokens_test"] == sum(int(m.sum()) for _, m in test)


def test_pair_table_is_used_when_context_repeats():
    # A small vocabulary makes pairs repeat, so the pair table must differ from the token table somewhere
    model = tiny_model("mixtral", seed=5)
    calib, test = _batches(2, 8, vocab_hi=8, pad_rows=False), _batches(3, 2, vocab_hi=8, pad_rows=False)
    got = heldout_predictability(model, calib, test, PredictabilityConfig(min_pair_count=1))
    hits = [r["table_hit"] for r in got["rows"] if r["predictor"] == "pair_table" and r["layer"] != "all"]
    assert min(hits) > 0.5
    ref = _brute(model, calib, test, 1)
    rows = {(r["layer"], r["predictor"]): r for r in got["rows"]}
    for layer in ref:
        assert rows[(layer, "pair_table")]["exact"] == pytest.approx(ref[layer]["pair_table"][0], abs=1e-9)


def test_control_is_seeded_and_differs_from_trained():
    model = tiny_model("mixtral", seed=7)
    a, b = random_init_control(model, seed=11), random_init_control(model, seed=11)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, msg=name)
    gate_a = dict(a.named_parameters())
    assert any(not torch.equal(p, gate_a[n]) for n, p in model.named_parameters())
    got = heldout_predictability(model, _batches(0, 3), _batches(1, 2), PredictabilityConfig(control_seed=11),
                                 control="random-init")
    assert {r["model"] for r in got["rows"]} == {"trained", "control"}
    assert set(got["summary"]["margin_trained_minus_control"]) == set(PREDICTORS)


def test_bad_control_is_rejected():
    with pytest.raises(ValueError, match="--control"):
        heldout_predictability(tiny_model("mixtral"), _batches(0, 1), _batches(1, 1), control="shuffled")
    with pytest.raises(ValueError, match="--min-pair-count"):
        PredictabilityConfig(min_pair_count=0)


def test_artifact_from_the_pass_agrees_with_a_capture_file(tmp_path):
    """The evidence pass over the captured sequences reproduces the capture's token counts (the check
    `VARTables.from_stats_file` records), and its chosen sets equal the capture's modal sets."""
    from var_moe.adapters import get_adapter
    from var_moe.capture.analyzer import RouterAnalyzer
    from var_moe.capture.schema import read_stats
    from var_moe.validation.predictability import as_documents
    from var_moe.var.config import VARConfig
    from var_moe.var.evidence import collect_evidence
    from var_moe.var.tables import VARTables, frequency_check

    model = tiny_model("mixtral", seed=3)
    calib = _batches(0, 6)
    analyzer = RouterAnalyzer(model)
    for ids, mask in calib:
        analyzer.analyze_batch(ids, mask)
    df, _ = read_stats(analyzer.write_parquet(tmp_path / "calib.parquet", {"split": "calibration"}))
    evidence = collect_evidence(model, as_documents(calib), get_adapter(model))
    assert frequency_check(df, evidence)["same_tokens"]
    tables = VARTables.from_evidence(evidence, model, get_adapter(model), VARConfig(), choose="all")
    for layer, t in tables.layers.items():
        sub = df[df.layer == layer]
        ids = torch.as_tensor(sub.token_id.to_numpy().copy())
        want = torch.as_tensor(list(sub.modal_topk_set.map(list))).sort(1).values
        got = t.experts_VK[ids].sort(1).values
        assert (got == want).all(1).float().mean() > 0.8  # ties may break differently
        assert int(t.member_V.sum()) == 0  # nothing certified when nothing is held out


def _loop_ci(num_D, den_D, pick_RD):
    ratios = [sum(num_D[d] for d in row) / sum(den_D[d] for d in row) for row in pick_RD.tolist()]
    return list(np.percentile(ratios, [2.5, 97.5]))


def test_ratio_ci95_matches_a_loop():
    num_D, den_D = np.array([3.0, 0.0, 7.0, 1.0]), np.array([4.0, 5.0, 9.0, 1.0])
    pick_RD = document_resamples(4, 300, seed=2)
    assert pick_RD.shape == (300, 4) and pick_RD.min() >= 0 and pick_RD.max() <= 3
    assert ratio_ci95(num_D, den_D, pick_RD) == pytest.approx(_loop_ci(num_D, den_D, pick_RD), abs=1e-12)
    # one document: no spread
    assert ratio_ci95(np.array([2.0]), np.array([8.0]), document_resamples(1, 50)) == [0.25, 0.25]


def test_intervals_resample_documents_like_a_brute_force_loop():
    """Hand-made documents spanning batches (ids 2, 5, 9, not in order): per-document counts and every
    interval (trained, control, paired margin, layers pooled) equal a loop over the brute-force scorer's
    per-sequence hits folded by document."""
    model = tiny_model("mixtral", seed=3)
    calib, test = _batches(0, 6), _batches(1, 3)
    doc_S = [5, 5, 2, 2, 9, 5, 9, 9, 2]
    batches = [EvalBatch(ids, mask, doc_S[3 * i:3 * i + 3]) for i, (ids, mask) in enumerate(test)]
    cfg = PredictabilityConfig(control_seed=4, resamples=200, bootstrap_seed=1)
    got = heldout_predictability(model, calib, batches, cfg, control="random-init")
    pd_ = got["per_document"]
    assert pd_["document_ids"] == [2, 5, 9] and pd_["documents"] == 3
    pick_RD = document_resamples(3, 200, seed=1)
    ref = {}
    for name, m in (("trained", model), ("control", random_init_control(model, 4))):
        per_seq = {}
        _brute(m, calib, test, 2, per_seq)
        ref[name] = {}
        for key, seqs in per_seq.items():
            hits, toks = np.zeros(3), np.zeros(3)
            for doc, (h, n) in zip(doc_S, seqs):
                hits[[2, 5, 9].index(doc)] += h
                toks[[2, 5, 9].index(doc)] += n
            ref[name][key] = (hits, toks)
    layers = sorted({layer for layer, _ in ref["trained"]})
    for layer in layers:
        assert pd_["tokens_LD"][layers.index(layer)] == ref["trained"][(layer, "token_table")][1].tolist()
    for r in got["rows"]:
        def counts(model_name, r=r):
            if r["layer"] == "all":
                parts = [ref[model_name][(layer, r["predictor"])] for layer in layers]
                return sum(h for h, _ in parts), sum(n for _, n in parts)
            return ref[model_name][(r["layer"], r["predictor"])]
        hits, toks = counts(r["model"])
        if r["layer"] != "all":
            assert pd_["hits_LD"][r["model"]][r["predictor"]]["exact"][layers.index(r["layer"])] == hits.tolist()
        assert r["exact_ci95"] == pytest.approx(_loop_ci(hits, toks, pick_RD), abs=1e-12), (r["model"], r["layer"])
        if r["model"] == "trained":
            margin = hits - counts("control")[0]
            assert r["exact_margin_ci95"] == pytest.approx(_loop_ci(margin, toks, pick_RD), abs=1e-12)
    spread = [r["exact_ci95"][1] - r["exact_ci95"][0] for r in got["rows"]]
    assert max(spread) > 0  # three unequal documents: the resamples differ


def test_without_documents_each_sequence_is_one():
    model = tiny_model("mixtral", seed=3)
    got = heldout_predictability(model, _batches(0, 2), _batches(1, 2), PredictabilityConfig(resamples=20))
    assert got["per_document"]["documents"] == 6
    assert sum(got["per_document"]["tokens_LD"][0]) == got["num_tokens_test"]
    with pytest.raises(ValueError, match="--resamples"):
        PredictabilityConfig(resamples=1)
