"""Merging shards equals one pass: in memory, from Parquet files, and through `varmoe merge-stats`."""

from collections import Counter

import pytest
import torch
from stats_compare import compare_stats

from var_moe.capture.analyzer import RouterAnalyzer
from var_moe.capture.dense_stats import densify, set_counts
from var_moe.capture.pairs import PairStats
from var_moe.capture.schema import StatsFileError, pairs_path, read_pairs, read_stats
from var_moe.cli import main
from var_moe.tiny import tiny_model

torch.set_num_threads(1)
INT_COLUMNS = ["frequency", "expert_ids", "top1_counts", "topk_counts", "top_expert", "modal_topk_set", "modal_set_count",
               "topk_set_ids", "topk_set_counts"]


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 30, (3, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0
        out.append((ids, mask))
    return out


@pytest.fixture(scope="module")
def shards():
    model = tiny_model("qwen2_moe", seed=2)
    a, b, whole = RouterAnalyzer(model), RouterAnalyzer(model), RouterAnalyzer(model)
    bs = batches(4, 0)
    for i, (ids, mask) in enumerate(bs):
        (a if i < 2 else b).analyze_batch(ids, mask)
        whole.analyze_batch(ids, mask)
    return a, b, whole


def test_merge_in_memory_equals_one_pass(shards):
    a, b, whole = shards
    merged = RouterAnalyzer(a.model)
    merged.stats.merge(a.stats).merge(b.stats)
    got, want = densify(merged.stats), densify(whole.stats)
    for key, value in want.items():
        if value.dtype == torch.long:
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12)
    assert set_counts(merged.stats) == set_counts(whole.stats)
    merged.pairs.merge(a.pairs).merge(b.pairs)
    assert compare_stats(merged.get_pair_analysis(), whole.get_pair_analysis()) == []


def test_merge_stats_cli_equals_one_pass(shards, tmp_path, capsys):
    a, b, whole = shards
    pa_, pb, pw = (x.write_parquet(tmp_path / f"{n}.parquet", {"dataset": "unit", "split": "test"})
                   for x, n in ((a, "a"), (b, "b"), (whole, "whole")))
    out = tmp_path / "merged.parquet"
    assert main(["merge-stats", str(pa_), str(pb), "-o", str(out)]) == 0
    df, meta = read_stats(out)
    ref, ref_meta = read_stats(pw)
    assert compare_stats(df, ref, rtol=1e-12, atol=1e-12) == []
    exact = compare_stats(df[["layer", "token_id", *INT_COLUMNS]], ref[["layer", "token_id", *INT_COLUMNS]])
    assert exact == []
    assert meta["num_tokens"] == ref_meta["num_tokens"] and meta["padding_excluded"] == ref_meta["padding_excluded"]
    assert meta["consecutive"] == ref_meta["consecutive"]
    assert compare_stats(read_pairs(pairs_path(out))[0], read_pairs(pairs_path(pw))[0]) == []


def test_merge_refuses_other_shapes(shards, tmp_path):
    a, _, _ = shards
    other = RouterAnalyzer(tiny_model("mixtral", seed=0))
    other.analyze_batch(*batches(1, 5)[0])
    pa_ = a.write_parquet(tmp_path / "a.parquet", {})
    po = other.write_parquet(tmp_path / "o.parquet", {})
    with pytest.raises(StatsFileError, match="o.parquet: cannot merge"):
        from var_moe.capture.merge import merge_files
        merge_files([pa_, po], tmp_path / "m.parquet")
    assert main(["merge-stats", str(pa_), "-o", str(tmp_path / "m.parquet")]) == 2


def test_lossy_pair_table_keeps_its_bounds():
    """With a small capacity the table prunes; every count stays within [true - delta, true]."""
    g = torch.Generator().manual_seed(0)
    ps = PairStats([0], vocab_size=50, num_experts=4, top_k=2, capacity=40, buffer_size=64)
    truth = Counter()
    for _ in range(30):
        # a skewed stream: a few frequent pairs and a long tail
        prev = torch.where(torch.rand(64, generator=g) < 0.6, torch.randint(0, 3, (64,), generator=g),
                           torch.randint(0, 50, (64,), generator=g))
        tok = torch.where(prev < 3, prev + 1, torch.randint(0, 50, (64,), generator=g))
        idx = torch.stack([torch.zeros(64, dtype=torch.long), 1 + (tok % 3)], dim=1)
        ps.update(0, prev, tok, idx)
        for p, t, i in zip(prev.tolist(), tok.tolist(), idx.tolist()):
            truth[(p, t, tuple(sorted(i)))] += 1
    ps.flush()
    err = ps.err[0]
    assert err > 0 and ps.keys[0].numel() <= 40
    width = ps.width
    from var_moe.capture.streaming_stats import decode_table
    sets = decode_table(4, 2)
    stored = {}
    for key, count, delta in zip(ps.keys[0].tolist(), ps.counts[0].tolist(), ps.deltas[0].tolist()):
        pair, sid = divmod(key, width)
        stored[(pair // 50, pair % 50, tuple(sets[sid].tolist()))] = (count, delta)
    for k, true in truth.items():
        if k in stored:
            count, delta = stored[k]
            assert count <= true <= count + delta
        else:
            assert true <= err
    frequent = [k for k, v in truth.items() if v > err]
    assert frequent and all(k in stored for k in frequent)
