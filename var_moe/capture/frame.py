"""Conversions between StreamingTokenStats tensors and the (layer, token) DataFrame of the schema.

`stats_to_dataframe(stats, tokenizer)` derives every contract column from the raw counts
(vectorized over all rows) and keeps the raw sufficient statistics beside them;
`stats_from_dataframe(df, metadata)` rebuilds the dense tensors so files merge exactly.
List columns are built as Arrow list arrays from flat buffers (no per-row Python work) and come
out of pandas as one NumPy array per cell, exactly as `read_stats` returns them.

Test: `pytest tests/test_capture_schema.py tests/test_capture_merge.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ..errors import InvalidInputError
from .schema import STATS_SCHEMA
from .streaming_stats import StreamingTokenStats, decode_table


def _fixed_lists(arr_NX: np.ndarray, typ: pa.DataType) -> pa.Array:
    n, x = arr_NX.shape
    offsets = pa.array(np.arange(0, n * x + 1, x, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(arr_NX.reshape(-1), type=typ))


def _ragged_lists(counts_NS: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """Nonzero entries of each row as (ids, counts) list arrays."""
    rows, cols = np.nonzero(counts_NS)
    per_row = np.bincount(rows, minlength=counts_NS.shape[0])
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))
    ids = pa.ListArray.from_arrays(offsets, pa.array(cols.astype(np.int64)))
    counts = pa.ListArray.from_arrays(offsets, pa.array(counts_NS[rows, cols].astype(np.int64)))
    return ids, counts


def token_strings(tokenizer: Any, token_ids: np.ndarray) -> list[str | None]:
    if tokenizer is None:
        return [None] * len(token_ids)
    uniq, inv = np.unique(token_ids, return_inverse=True)
    decoded = tokenizer.batch_decode([[int(i)] for i in uniq])  # once per distinct id, not per row
    return [decoded[j] for j in inv]


def stats_to_dataframe(stats: StreamingTokenStats, tokenizer: Any = None):
    t = {k: v.detach().cpu() for k, v in stats.tensors.items()}
    count_LV = t["count_LV"]
    slot_N, tok_N = torch.nonzero(count_LV > 0, as_tuple=True)
    freq = count_LV[slot_N, tok_N]
    freq_d = freq.double()
    top1_NE = t["top1_LVE"][slot_N, tok_N]
    topk_NE = t["topk_LVE"][slot_N, tok_N]
    k = stats.top_k
    top_expert = top1_NE.argmax(dim=1)
    if stats.exact_sets:
        sets_NS = t["set_LVS"][slot_N, tok_N]
        modal_count, modal_id = sets_NS.max(dim=1)
        modal_NK = decode_table(stats.num_experts, k)[modal_id]
    else:
        sets_NS = None
        modal_count = None
        # without set counts the modal set is the k experts most often chosen (ties: lowest index)
        modal_NK = topk_NE.double().add(-torch.arange(stats.num_experts) * 1e-9).topk(k, dim=1).indices.sort(dim=1).values
    overlap = topk_NE.gather(1, modal_NK).sum(dim=1).double() / (k * freq_d)
    m2_ent = t["m2_entropy_LV"][slot_N, tok_N]
    m2_conf = t["m2_confidence_LV"][slot_N, tok_N]
    sum_margin = t["sum_margin_LV"][slot_N, tok_N]
    layer_ids = torch.tensor(stats.layer_ids, dtype=torch.long)[slot_N]
    cols: dict[str, Any] = {
        "layer": pa.array(layer_ids.numpy().astype(np.int32)),
        "token_id": pa.array(tok_N.numpy().astype(np.int32)),
        "token_str": pa.array(token_strings(tokenizer, tok_N.numpy()), type=pa.string()),
        "frequency": pa.array(freq.numpy().astype(np.int64)),
        "mean_entropy": pa.array(t["mean_entropy_LV"][slot_N, tok_N].numpy()),
        "std_entropy": pa.array((m2_ent / freq_d).clamp_min(0).sqrt().numpy()),
        "mean_confidence": pa.array(t["mean_confidence_LV"][slot_N, tok_N].numpy()),
        "std_confidence": pa.array((m2_conf / freq_d).clamp_min(0).sqrt().numpy()),
        "mean_margin": pa.array((sum_margin / freq_d).numpy()),
        "top1_counts": _fixed_lists(top1_NE.numpy().astype(np.int64), pa.int64()),
        "topk_counts": _fixed_lists(topk_NE.numpy().astype(np.int64), pa.int64()),
        "topk_weight_sums": _fixed_lists(t["topk_w_LVE"][slot_N, tok_N].numpy(), pa.float64()),
        "top_expert": pa.array(top_expert.numpy().astype(np.int32)),
        "routing_consistency": pa.array((top1_NE.gather(1, top_expert[:, None])[:, 0].double() / freq_d).numpy()),
        "modal_topk_set": _fixed_lists(modal_NK.numpy().astype(np.int32), pa.int32()),
        "modal_set_count": pa.array(modal_count.numpy().astype(np.int64) if modal_count is not None else [None] * len(freq), type=pa.int64()),
        "topk_overlap": pa.array(overlap.numpy()),
        "m2_entropy": pa.array(m2_ent.numpy()),
        "m2_confidence": pa.array(m2_conf.numpy()),
        "sum_margin": pa.array(sum_margin.numpy()),
    }
    if sets_NS is not None:
        cols["topk_set_ids"], cols["topk_set_counts"] = _ragged_lists(sets_NS.numpy())
    else:
        nulls = pa.nulls(len(freq), type=pa.list_(pa.int64()))
        cols["topk_set_ids"], cols["topk_set_counts"] = nulls, nulls
    table = pa.Table.from_pydict(cols, schema=STATS_SCHEMA)
    return table.to_pandas()


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, copy=True))  # pandas may hand out read-only buffers


def _stack(column: Any, width: int, dtype: Any) -> np.ndarray:
    if len(column) == 0:
        return np.zeros((0, width), dtype=dtype)
    return np.stack(column.to_numpy()).astype(dtype)


def stats_from_dataframe(df: Any, metadata: dict[str, Any], device: str | torch.device = "cpu") -> StreamingTokenStats:
    """Rebuild the dense statistics of a file (exactly: raw sums, counts and M2 are stored)."""
    try:
        layers = [int(x) for x in metadata["layers"]]
        V, E, K = int(metadata["vocab_size"]), int(metadata["num_experts"]), int(metadata["top_k"])
    except KeyError as exc:
        raise InvalidInputError(f"statistics metadata lacks {exc.args[0]!r}") from None
    stats = StreamingTokenStats(len(layers), V, E, K, device="cpu", layer_ids=layers)
    if bool(metadata.get("exact_sets", stats.exact_sets)) != stats.exact_sets:
        raise InvalidInputError("statistics file and this version disagree on whether top-k sets are counted")
    slot_of = np.full(max(layers) + 1, -1, dtype=np.int64)
    slot_of[layers] = np.arange(len(layers))
    layer_N = df["layer"].to_numpy().astype(np.int64)
    if len(df) and (layer_N.max() >= len(slot_of) or (slot_of[layer_N] < 0).any()):
        raise InvalidInputError(f"rows name layers outside the metadata's layers {layers}")
    slot_N = torch.from_numpy(slot_of[layer_N])
    tok_N = _tensor(df["token_id"].to_numpy().astype(np.int64))
    t = stats.tensors
    t["count_LV"][slot_N, tok_N] = _tensor(df["frequency"].to_numpy().astype(np.int64))
    for name in ("entropy", "confidence"):
        t[f"mean_{name}_LV"][slot_N, tok_N] = _tensor(df[f"mean_{name}"].to_numpy(np.float64))
        t[f"m2_{name}_LV"][slot_N, tok_N] = _tensor(df[f"m2_{name}"].to_numpy(np.float64))
    t["sum_margin_LV"][slot_N, tok_N] = _tensor(df["sum_margin"].to_numpy(np.float64))
    t["top1_LVE"][slot_N, tok_N] = torch.from_numpy(_stack(df["top1_counts"], E, np.int64))
    t["topk_LVE"][slot_N, tok_N] = torch.from_numpy(_stack(df["topk_counts"], E, np.int64))
    t["topk_w_LVE"][slot_N, tok_N] = torch.from_numpy(_stack(df["topk_weight_sums"], E, np.float64))
    if stats.exact_sets and len(df):
        lengths = df["topk_set_ids"].map(len).to_numpy()
        ids = np.concatenate(df["topk_set_ids"].to_numpy()).astype(np.int64)
        counts = np.concatenate(df["topk_set_counts"].to_numpy()).astype(np.int64)
        rows = np.repeat(np.arange(len(df)), lengths)
        t["set_LVS"][slot_N[rows], tok_N[rows], torch.from_numpy(ids)] = torch.from_numpy(counts)
    consecutive = metadata.get("consecutive", {})
    for slot, layer in enumerate(layers):
        c = consecutive.get(str(layer), {})
        t["pairs_L"][slot] = int(c.get("pairs", 0))
        t["same_top1_L"][slot] = int(c.get("same_top1", 0))
        t["in_top2_L"][slot] = int(c.get("in_top2", 0))
        t["share_top2_L"][slot] = int(c.get("share_top2", 0))
    if torch.device(device) != torch.device("cpu"):
        stats.device = torch.device(device)
        stats.tensors = {k: v.to(device) for k, v in t.items()}
        stats._binom = stats._binom.to(device)
    return stats
