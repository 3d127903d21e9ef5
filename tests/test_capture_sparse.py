"""Sparse capture statistics: the hash index, lossy set counting, equality with the dense
accumulator on the committed reference model, schema-1 files read as schema 2, and the
published-shape model helper."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from var_moe.capture.analyzer import RouterAnalyzer
from var_moe.capture.dense_stats import DenseTokenStats, densify, set_counts
from var_moe.capture.hash_index import HashIndex
from var_moe.capture.schema import densify_experts, read_stats
from var_moe.capture.streaming_stats import StreamingTokenStats

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def test_hash_index_matches_a_dict():
    g = torch.Generator().manual_seed(0)
    h, ref = HashIndex(expected=4), {}
    for _ in range(20):  # grows through several rehashes
        keys = torch.randint(0, 5000, (700,), generator=g) * 1_000_003  # duplicates inside a batch too
        idx = h.insert(keys)
        for k, i in zip(keys.tolist(), idx.tolist()):
            assert ref.setdefault(k, i) == i
    assert sorted(ref.values()) == list(range(len(ref))) == list(range(len(h)))
    assert h.keys.tolist() == sorted(ref, key=ref.get)
    q = torch.randint(0, 6000, (3000,), generator=g) * 1_000_003
    assert h.lookup(q).tolist() == [ref.get(k, -1) for k in q.tolist()]


def _batch(g, L, V, E, K, T):
    ids = torch.randint(0, V, (T,), generator=g) // torch.randint(1, 4, (T,), generator=g)
    probs = (2 * torch.randn(L, T, E, generator=g)).softmax(-1)
    w, idx = probs.topk(K, -1)
    return ids, probs, idx, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("direct", [True, False])
def test_lossy_set_counts_keep_their_bounds(direct):
    """Past capacity: every kept set's true count lies in [count, count + delta], an absent set
    occurred at most set_err times; merging two pruned shards keeps both bounds."""
    L, V, E, K = 2, 30, 6, 2
    g = torch.Generator().manual_seed(1)
    shards, truth = [], [Counter(), Counter()]
    for s in range(2):
        st = StreamingTokenStats(L, V, E, K, set_capacity=24)
        st.direct_sets = direct  # the dictionary path of very large C(E, k), exercised here
        for _ in range(5):
            ids, probs, idx, w = _batch(g, L, V, E, K, 30)
            st.update_layers(range(L), ids, probs, idx, w)
            sets = idx.sort(-1).values
            for slot in range(L):
                for t, row in zip(ids.tolist(), sets[slot].tolist()):
                    truth[s][(slot, t, tuple(row))] += 1
        shards.append(st)
    merged = StreamingTokenStats(L, V, E, K, set_capacity=24)
    merged.direct_sets = direct
    merged.merge(shards[0]).merge(shards[1])
    for st, true in ((shards[0], truth[0]), (shards[1], truth[1]), (merged, truth[0] + truth[1])):
        assert st.set_err > 0  # pruning happened
        from var_moe.capture.streaming_stats import binomial_table, encode_sets

        code = {s: int(encode_sets(torch.tensor([s]), binomial_table(E, K))[0]) for (_, _, s) in true}
        got = set_counts(st)
        row, sid = st._split_set_keys(st.sets.keys)
        tok, slot = st.token_R[row // L], row % L
        bounds = {(int(a), int(b), int(c)): (int(n), int(n + d)) for a, b, c, n, d in
                  zip(slot, tok, sid, st.set_count[: len(st.sets)], st.set_delta[: len(st.sets)])}
        assert set(bounds) == set(got)
        for (slot_, tok_, s), n in true.items():
            key = (slot_, tok_, code[s])
            if key in bounds:
                lo, hi = bounds[key]
                assert lo <= n <= hi
            else:
                assert n <= st.set_err


def test_sparse_equals_dense_on_the_reference_model():
    """Capture of the committed reference model: sparse state == dense accumulator (counts
    bit-exact, floats to 1e-12), and the written frame's sparse lists densify to the dense rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ROOT / "models" / "reference-moe"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    analyzer = RouterAnalyzer(model, tokenizer=tok)
    s = analyzer.stats
    dense = DenseTokenStats(s.num_layers, s.vocab_size, s.num_experts, s.top_k, layer_ids=s.layer_ids)
    sparse_update = s.update_layers

    def both(*args):
        dense.update_layers(*args)
        return sparse_update(*args)

    s.update_layers = both
    text = (ROOT / "var_moe" / "capture" / "streaming_stats.py").read_text()[:6000]
    ids = tok(text, return_tensors="pt")["input_ids"][0][:512]
    batch = ids[: 4 * 128].reshape(4, 128)
    mask = torch.ones_like(batch)
    mask[1, 100:] = 0
    analyzer.analyze_batch(batch, mask)
    analyzer.analyze_batch(batch[:, :64], mask[:, :64])
    got = densify(s)
    for key, want in dense.tensors.items():
        if key in ("pairs_L", "same_top1_L", "in_top2_L", "share_top2_L"):
            continue  # consecutive counts are not part of update_layers (test_capture_stats checks them)
        if key == "set_LVS":
            nz = want.nonzero()
            assert set_counts(s) == {(int(a), int(b), int(c)): int(want[a, b, c]) for a, b, c in nz}
        elif want.dtype == torch.long:
            assert torch.equal(got[key], want), key
        else:
            torch.testing.assert_close(got[key], want, rtol=1e-12, atol=1e-12)
    df = analyzer.get_vocabulary_analysis()
    slot = np.array([s.layer_ids.index(x) for x in df["layer"]])
    tokens = df["token_id"].to_numpy()
    for col, name in (("top1_counts", "top1_LVE"), ("topk_counts", "topk_LVE"), ("topk_weight_sums", "topk_w_LVE")):
        np.testing.assert_array_equal(densify_experts(df, col, s.num_experts), dense.tensors[name][slot, tokens].numpy())
    sets = dense.tensors["set_LVS"][slot, tokens]
    assert df["modal_set_count"].tolist() == sets.max(dim=1).values.tolist()


def test_schema_1_file_reads_as_schema_2():
    path = ROOT / "results" / "phase1" / "stats_test.parquet"
    raw = pq.read_table(path)
    if json.loads(raw.schema.metadata[b"var_moe"]).get("schema_version") != 1:
        pytest.skip("the committed file is not schema 1")
    df, meta = read_stats(path)
    old = raw.to_pandas()
    for col in ("top1_counts", "topk_counts", "topk_weight_sums"):
        np.testing.assert_array_equal(densify_experts(df, col, int(meta["num_experts"])), np.stack(old[col].to_numpy()))
    assert all((np.asarray(c) > 0).all() for c in df["topk_counts"])


def test_shape_model_has_the_published_routing_shape():
    from var_moe.adapters import get_adapter
    from var_moe.shapes import shape_model

    model = shape_model("kimi-k2", layers=2, vocab_size=300)
    adapter = get_adapter(model)
    assert (adapter.num_experts, adapter.top_k, adapter.num_shared_experts) == (384, 8, 1)
    assert len(adapter.moe_layers(model)) == 2 and model.config.num_hidden_layers == 3  # first layer dense
    analyzer = RouterAnalyzer(model)
    analyzer.analyze_batch(torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0)))
    assert analyzer.stats.num_tokens == 32 and not analyzer.stats.direct_sets  # C(384, 8) sets via the dictionary
    df = analyzer.get_vocabulary_analysis()
    assert (df["modal_set_count"] >= 1).all() and all(len(x) == 8 for x in df["modal_topk_set"])
