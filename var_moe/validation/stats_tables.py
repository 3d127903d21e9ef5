"""Prediction tables read from captured statistics files instead of built by the calibration pass.

`tables_from_stats(stats_df, stats_meta, pairs_df, fallback, min_pair_count)` turns a calibration
capture (`varmoe capture --split calibration`) into per-layer `ModalTables`:
- token sets: the `modal_topk_set` column (sorted) of every (layer, token) row with frequency > 0,
- pair sets: the sidecar's `modal_topk_set` for (prev, token) rows with frequency >=
  min_pair_count (the sidecar is exact where its metadata's error bound is 0),
- the global set comes from `fallback` (the calibration pass's own table), because a statistics
  file only holds per-token marginals, not the joint count of every set.
Scored as the predictors `stats_token_table` / `stats_pair_table` next to the pass-built ones, so
a difference between the two shows what the capture's modal-set definition costs.
Test: `pytest tests/test_validation_predictability.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import InvalidInputError
from .tables import ModalTables


def _sets(column: pd.Series, k: int, flag: str) -> torch.Tensor:
    arr = np.stack([np.asarray(x, dtype=np.int64) for x in column]) if len(column) else np.zeros((0, k), np.int64)
    if arr.shape[1] != k:
        raise InvalidInputError(f"{flag}: modal_topk_set has {arr.shape[1]} experts, the model routes to top-{k}")
    return torch.sort(torch.from_numpy(arr), dim=1).values


def tables_from_stats(stats_df: pd.DataFrame, stats_meta: dict[str, Any], pairs_df: pd.DataFrame | None,
                      fallback: dict[int, ModalTables], min_pair_count: int = 1,
                      flag: str = "--calibration-stats") -> dict[int, ModalTables]:
    some = next(iter(fallback.values()))
    v, k = some.vocab_size, some.top_k
    if int(stats_meta.get("vocab_size", v)) != v:
        raise InvalidInputError(f"{flag}: statistics of a vocabulary of {stats_meta.get('vocab_size')} tokens, the model has {v}")
    if stats_meta.get("split") == "test":
        raise InvalidInputError(f"{flag}: these statistics were captured on the test split; tables must come from calibration")
    out: dict[int, ModalTables] = {}
    for layer, own in fallback.items():
        sub = stats_df[(stats_df["layer"] == layer) & (stats_df["frequency"] > 0)]
        if sub.empty:
            raise InvalidInputError(f"{flag}: no rows for layer {layer}")
        ids = torch.from_numpy(sub["token_id"].to_numpy(np.int64).copy())
        token_sets = torch.full((v, k), -1, dtype=torch.long)
        token_sets[ids] = _sets(sub["modal_topk_set"], k, flag)
        token_counts = torch.zeros(v, dtype=torch.long)
        token_counts[ids] = torch.from_numpy(sub["frequency"].to_numpy(np.int64).copy())
        keys = torch.zeros(0, dtype=torch.long)
        psets = torch.zeros((0, k), dtype=torch.long)
        if pairs_df is not None:
            p = pairs_df[(pairs_df["layer"] == layer) & (pairs_df["frequency"] >= min_pair_count)]
            p = p[p["modal_topk_set"].notna()]  # rows of the sidecar's "expert" mode carry no set
            if len(p):
                keys = torch.as_tensor(p["prev_token_id"].to_numpy(np.int64) * v + p["token_id"].to_numpy(np.int64))
                psets = _sets(p["modal_topk_set"], k, flag + " pairs")
                order = torch.argsort(keys)
                keys, psets = keys[order], psets[order]
        out[layer] = ModalTables(v, k, token_sets, token_counts, keys, psets, own.global_set_K)
    return out
