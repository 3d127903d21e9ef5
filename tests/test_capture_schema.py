"""The Parquet schema module: write-then-read round trip with metadata, and clear errors on wrong files."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from var_moe.capture.analyzer import RouterAnalyzer
from var_moe.capture.schema import STATS_COLUMNS, StatsFileError, pairs_path, read_pairs, read_stats, write_stats
from var_moe.tiny import tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def analyzer():
    model = tiny_model("mixtral", seed=0)
    a = RouterAnalyzer(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    a.analyze_batch(ids, mask)
    return a


def test_round_trip_with_metadata(analyzer, tmp_path):
    path = analyzer.write_parquet(tmp_path / "s.parquet", {"dataset": "unit", "split": "test"})
    df, meta = read_stats(path)
    ref = analyzer.get_vocabulary_analysis()
    assert list(df.columns) == list(STATS_COLUMNS)
    for col in df.columns:
        if df[col].dtype == object and col != "token_str":
            assert [list(x) if x is not None else None for x in df[col]] == [list(x) if x is not None else None for x in ref[col]], col
        else:
            pd.testing.assert_series_equal(df[col], ref[col], check_exact=True)
    assert meta["dataset"] == "unit" and meta["split"] == "test"
    assert meta["num_tokens"] == 27 - 3 and meta["padding_excluded"] == 3
    assert meta["max_entropy_nats"] == pytest.approx(np.log(4))
    assert meta["num_experts"] == 4 and meta["top_k"] == 2 and meta["vocab_size"] == 99 and meta["layers"] == [0, 1]
    assert set(meta["library_versions"]) >= {"torch", "transformers", "var_moe"}
    assert set(meta["consecutive"]["0"]) >= {"same_top1_rate", "top1_in_prev_top2_rate", "pairs"}
    pdf, pmeta = read_pairs(pairs_path(path))
    assert pmeta["pairs"]["mode"] == "set" and len(pdf) == len(analyzer.get_pair_analysis())
    assert pairs_path("a/b.parquet").as_posix() == "a/b.pairs.parquet"


def test_schema_has_units_and_contract_columns():
    contract = ["layer", "token_id", "token_str", "frequency", "mean_entropy", "std_entropy", "mean_confidence",
                "std_confidence", "mean_margin", "expert_ids", "top1_counts", "topk_counts", "topk_weight_sums", "top_expert",
                "routing_consistency", "modal_topk_set", "modal_set_count", "topk_overlap"]
    assert list(STATS_COLUMNS[: len(contract)]) == contract


def test_wrong_files_get_errors_naming_them(analyzer, tmp_path):
    with pytest.raises(StatsFileError, match="nope.parquet"):
        read_stats(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"layer": [0], "token_id": [1]}), bad)
    with pytest.raises(StatsFileError, match=r"bad\.parquet.*missing columns"):
        read_stats(bad)
    df = analyzer.get_vocabulary_analysis()
    df["frequency"] = df["frequency"].astype(float)
    path = tmp_path / "typed.parquet"
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata({b"var_moe": json.dumps({}).encode()})
    pq.write_table(table, path)
    with pytest.raises(StatsFileError, match=r"typed\.parquet.*'frequency' has type double"):
        read_stats(path)
    with pytest.raises(StatsFileError, match="lacks columns"):
        write_stats(df.drop(columns=["top_expert"]), tmp_path / "x.parquet", {})
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(StatsFileError, match="text.parquet"):
        read_stats(tmp_path / "text.parquet")
