"""Exact merge of statistics files from several shards (Chan's parallel Welford for the moments).

Each file carries its raw sufficient statistics (counts, float64 means with M2, margin sums, set
counts), so `merge_files([a, b], out)` equals one pass over the union of the shards: integer
columns bit for bit, moments to float64 rounding. Pair sidecars are merged too when every input
has one. Files must come from the same model shape (model_type, vocabulary, E, k, layers).

CLI: `varmoe merge-stats a.parquet b.parquet -o all.parquet`. Test: `pytest tests/test_capture_merge.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..errors import InvalidInputError
from .frame import stats_from_dataframe, stats_to_dataframe
from .pairs import PairStats
from .schema import StatsFileError, pairs_path, read_pairs, read_stats, write_pairs, write_stats

_SHAPE_KEYS = ("model_type", "vocab_size", "num_experts", "top_k", "layers")


def _check_same_shape(metas: Sequence[dict[str, Any]], paths: Sequence[Path]) -> None:
    first = {k: metas[0].get(k) for k in _SHAPE_KEYS}
    for meta, path in zip(metas[1:], paths[1:]):
        other = {k: meta.get(k) for k in _SHAPE_KEYS}
        if other != first:
            diff = {k: (first[k], other[k]) for k in _SHAPE_KEYS if first[k] != other[k]}
            raise StatsFileError(f"{path}: cannot merge with {paths[0]}, they differ in {diff}")


def merge_files(inputs: Sequence[str | Path], output: str | Path) -> Path:
    paths = [Path(p) for p in inputs]
    if len(paths) < 2:
        raise InvalidInputError("merge-stats needs at least two input files")
    if Path(output).resolve() in {p.resolve() for p in paths}:
        raise InvalidInputError(f"-o {output}: the output must not be one of the inputs")
    frames, metas = zip(*(read_stats(p) for p in paths))
    _check_same_shape(metas, paths)
    merged = stats_from_dataframe(frames[0], metas[0])
    for df, meta in zip(frames[1:], metas[1:]):
        merged.merge(stats_from_dataframe(df, meta))
    out_df = stats_to_dataframe(merged)
    names = pd.concat([f[["token_id", "token_str"]] for f in frames]).dropna().drop_duplicates("token_id")
    token_str = out_df["token_id"].map(names.set_index("token_id")["token_str"])
    out_df["token_str"] = token_str.astype(object).where(token_str.notna(), None)
    meta = dict(metas[0])
    meta.update(
        num_tokens=merged.num_tokens,
        padding_excluded=sum(int(m.get("padding_excluded", 0)) for m in metas),
        consecutive=merged.consecutive_rates(),
        modal_set_count_exact=merged.set_err == 0,
        **merged.describe(),
        merged_from=[{"path": str(p), "dataset": m.get("dataset"), "split": m.get("split"),
                      "num_tokens": m.get("num_tokens")} for p, m in zip(paths, metas)],
        dataset=sorted({str(m.get("dataset")) for m in metas}) if len({m.get("dataset") for m in metas}) > 1 else metas[0].get("dataset"),
        split=sorted({str(m.get("split")) for m in metas}) if len({m.get("split") for m in metas}) > 1 else metas[0].get("split"),
    )
    sidecars = [pairs_path(p) for p in paths]
    if all(s.exists() for s in sidecars):
        pair_frames, pair_metas = zip(*(read_pairs(s) for s in sidecars))
        capacity = max(int(m.get("pairs", {}).get("capacity_keys_per_layer", 2)) for m in pair_metas)
        pairs = PairStats.from_dataframe(pair_frames[0], pair_metas[0], capacity=capacity)
        for df, m in zip(pair_frames[1:], pair_metas[1:]):
            pairs.merge(PairStats.from_dataframe(df, m, capacity=capacity))
        meta["pairs"] = pairs.describe()
        write_pairs(pairs.to_dataframe(), pairs_path(output), meta)
    elif meta.pop("pairs", None) is not None:
        meta["pairs_dropped"] = "not every input had a pair sidecar"
    return write_stats(out_df, output, meta)
