"""Streaming statistics equal a brute-force recomputation over the hooked router outputs.

A second RoutingRecorder stores every router decision of padded batches; plain Python/NumPy loops
then recompute counts, Welford moments, modal sets, consecutive-token rates and pair counts.
"""

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from var_moe.capture.analyzer import RouterAnalyzer
from var_moe.capture.dense_stats import densify
from var_moe.capture.recorder import RoutingRecorder
from var_moe.tiny import tiny_model

torch.set_num_threads(1)


def dense(row, column, num_experts):
    """A sparse per-expert list of one row as a length-E array."""
    out = np.zeros(num_experts, dtype=np.float64 if column == "topk_weight_sums" else np.int64)
    out[np.asarray(row.expert_ids, dtype=np.int64)] = getattr(row, column)
    return out


def padded_batches(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for side, lengths in (("right", [7, 3, 5]), ("left", [6, 2, 6, 4])):
        width = max(lengths)
        # a small id range so tokens repeat and pairs recur
        ids = torch.randint(3, 12, (len(lengths), width), generator=g)
        mask = torch.zeros_like(ids)
        for r, n in enumerate(lengths):
            if side == "right":
                mask[r, :n] = 1
            else:
                mask[r, width - n:] = 1
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # pad id 0
        out.append((ids, mask))
    return out


def record_raw(model, batches, layer_indices=None):
    rows = []

    def cb(layer, tokens, d):
        rows.append(dict(layer=layer, ids=tokens.ids_T.tolist(), valid=tokens.valid_T.tolist(),
                         prev=tokens.prev_T.tolist(), b=tokens.batch_size, s=tokens.seq_len,
                         probs=d.probs_TE.double().numpy(), idx=d.topk_idx_TK.numpy(), w=d.topk_w_TK.double().numpy()))

    return rows, RoutingRecorder(model, cb, layer_indices=layer_indices, window=1)


def brute_force(rows, E, k):
    occ = defaultdict(list)  # (layer, tok) -> list of (entropy, conf, margin, first, second, set, weights)
    consec = defaultdict(lambda: [0, 0, 0, 0])
    pairs = defaultdict(Counter)
    for r in rows:
        b, s = r["b"], r["s"]
        firsts = {}
        for t in range(b * s):
            if not r["valid"][t]:
                continue
            p = r["probs"][t]
            ent = -sum(x * np.log(x) for x in p if x > 0)
            sp = sorted(p, reverse=True)
            order = sorted(range(k), key=lambda j: -r["w"][t][j])
            first, second = int(r["idx"][t][order[0]]), int(r["idx"][t][order[1]])
            chosen = tuple(sorted(int(x) for x in r["idx"][t]))
            occ[(r["layer"], r["ids"][t])].append((ent, sp[0], sp[0] - sp[1], first, chosen, dict(zip(r["idx"][t].tolist(), r["w"][t].tolist()))))
            firsts[t] = (first, second)
            if r["prev"][t] >= 0:
                pairs[(r["layer"], r["prev"][t], r["ids"][t])][chosen] += 1
        for t in firsts:  # previous valid position of the same row
            row, pos = divmod(t, s)
            prev = [row * s + q for q in range(pos) if (row * s + q) in firsts]
            if prev:
                c = consec[r["layer"]]
                c[0] += 1
                c[1] += firsts[prev[-1]][0] == firsts[t][0]
                c[2] += firsts[t][0] in firsts[prev[-1]]
                c[3] += bool(set(firsts[t]) & set(firsts[prev[-1]]))
    return occ, consec, pairs


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_streaming_equals_brute_force(family):
    model = tiny_model(family, seed=3)
    analyzer = RouterAnalyzer(model)
    rows, rec = record_raw(model, None)
    batches = padded_batches(model.config.vocab_size)
    with rec:
        for ids, mask in batches:
            analyzer.analyze_batch(ids, mask)
    E, k = analyzer.stats.num_experts, analyzer.stats.top_k
    occ, consec, pairs = brute_force(rows, E, k)
    df = analyzer.get_vocabulary_analysis()
    assert sorted(zip(df.layer, df.token_id)) == sorted(occ)
    assert 0 not in set(df.token_id)  # padding (id 0) never counted
    assert analyzer.padding_excluded == sum(int((m == 0).sum()) for _, m in batches)
    for row in df.itertuples():
        o = occ[(row.layer, row.token_id)]
        ent, conf, margin = (np.array([x[i] for x in o]) for i in range(3))
        assert row.frequency == len(o)
        np.testing.assert_allclose([row.mean_entropy, row.std_entropy], [ent.mean(), ent.std()], atol=1e-5)
        np.testing.assert_allclose([row.mean_confidence, row.std_confidence], [conf.mean(), conf.std()], atol=1e-5)
        np.testing.assert_allclose(row.mean_margin, margin.mean(), atol=1e-5)
        top1 = np.bincount([x[3] for x in o], minlength=E)
        topk = np.bincount([e for x in o for e in x[4]], minlength=E)
        wsum = np.zeros(E)
        for x in o:
            for e, w in x[5].items():
                wsum[e] += w
        assert row.expert_ids.tolist() == np.nonzero(topk)[0].tolist()  # only experts seen, ascending
        assert dense(row, "top1_counts", E).tolist() == top1.tolist()
        assert dense(row, "topk_counts", E).tolist() == topk.tolist()
        np.testing.assert_allclose(dense(row, "topk_weight_sums", E), wsum, atol=1e-5)
        assert row.top_expert == int(np.argmax(top1))
        assert row.routing_consistency == pytest.approx(top1.max() / len(o))
        sets = Counter(x[4] for x in o)
        best = max(sets.values())
        assert row.modal_set_count == best
        assert sets[tuple(row.modal_topk_set.tolist())] == best
        modal = set(row.modal_topk_set.tolist())
        overlap = np.mean([len(modal & set(x[4])) / k for x in o])
        assert row.topk_overlap == pytest.approx(overlap)
    rates = analyzer.stats.consecutive_rates()
    for layer, (n, same, in2, share) in consec.items():
        r = rates[str(layer)]
        assert (r["pairs"], r["same_top1"], r["in_top2"], r["share_top2"]) == (n, same, in2, share)
    pdf = analyzer.get_pair_analysis()
    assert len(pdf) == len(pairs)
    for row in pdf.itertuples():
        c = pairs[(row.layer, row.prev_token_id, row.token_id)]
        assert row.frequency == sum(c.values())
        assert row.modal_set_count == max(c.values())
        assert c[tuple(row.modal_topk_set.tolist())] == max(c.values())
        assert row.max_undercount == 0


def test_decode_steps_continue_sequences():
    """generate(): pairs and consecutive counts cross decode steps exactly as one long forward."""
    model = tiny_model("mixtral", seed=1)
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(0))
    a = RouterAnalyzer(model)
    with a.capturing():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    b = RouterAnalyzer(model)
    b.analyze_batch(out[:, :-1])  # the last generated token was never fed back
    da, db = densify(a.stats), densify(b.stats)
    for key in ("count_LV", "top1_LVE", "pairs_L", "same_top1_L", "in_top2_L", "share_top2_L"):
        torch.testing.assert_close(da[key], db[key])
    pa_, pb = a.get_pair_analysis(), b.get_pair_analysis()
    assert pa_[["layer", "prev_token_id", "token_id", "frequency"]].values.tolist() == \
        pb[["layer", "prev_token_id", "token_id", "frequency"]].values.tolist()


def test_many_experts_still_count_sets():
    """C(E, k) > 128: sets are still counted (sparse, exact while nothing was pruned), the pair
    table is in expert mode; counts stay exact."""
    model = tiny_model("mixtral", seed=5, num_local_experts=16, num_experts_per_tok=4)
    analyzer = RouterAnalyzer(model)
    assert analyzer.pairs.mode == "expert"
    rows, rec = record_raw(model, None)
    with rec:
        for ids, mask in padded_batches(99, seed=2):
            analyzer.analyze_batch(ids, mask)
    occ, _, pairs = brute_force(rows, 16, 4)
    df = analyzer.get_vocabulary_analysis()
    assert analyzer.stats.set_err == 0 and analyzer.metadata()["modal_set_count_exact"]
    for row in df.itertuples():
        o = occ[(row.layer, row.token_id)]
        topk = np.bincount([e for x in o for e in x[4]], minlength=16)
        assert row.frequency == len(o) and dense(row, "topk_counts", 16).tolist() == topk.tolist()
        sets = Counter(x[4] for x in o)
        best = max(sets.values())
        assert row.modal_set_count == best and sets[tuple(row.modal_topk_set.tolist())] == best
        assert sum(row.topk_set_counts) == len(o) and len(row.topk_set_ids) == len(sets)
        modal = set(row.modal_topk_set.tolist())
        assert row.topk_overlap == pytest.approx(np.mean([len(modal & set(x[4])) / 4 for x in o]))
    pdf = analyzer.get_pair_analysis()
    assert len(pdf) == len(pairs)
    for row in pdf.itertuples():
        c = pairs[(row.layer, row.prev_token_id, row.token_id)]
        assert row.frequency == sum(c.values())
        members = Counter(e for s, n in c.items() for e in s for _ in range(n))
        assert dict(zip(row.key_ids.tolist(), row.key_counts.tolist())) == {**members, 16: sum(c.values())}


def test_layer_by_layer_update_equals_batched_update():
    """`update` per slot and `update_layers` for all slots at once give identical state."""
    from var_moe.capture.streaming_stats import StreamingTokenStats

    g = torch.Generator().manual_seed(0)
    L, T, V, E, K = 3, 50, 20, 6, 2
    ids = torch.randint(0, V, (T,), generator=g)
    probs = torch.softmax(torch.randn(L, T, E, generator=g), dim=2)
    w, idx = probs.topk(K, dim=2)
    one, many = StreamingTokenStats(L, V, E, K), StreamingTokenStats(L, V, E, K)
    for step in range(2):  # two steps so the Chan combination with a non-empty state is exercised
        for slot in range(L):
            one.update(slot, ids, probs[slot], idx[slot], w[slot])
        many.update_layers(list(range(L)), ids, probs, idx, w)
    d_one, d_many = densify(one), densify(many)
    for key, value in d_one.items():
        torch.testing.assert_close(d_many[key], value, rtol=0, atol=1e-12)
