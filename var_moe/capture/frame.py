"""Conversions between StreamingTokenStats tensors and the (layer, token) DataFrame of the schema.

`stats_to_dataframe(stats, tokenizer)` derives every contract column from the raw counts
(vectorized over all rows) and keeps the raw sufficient statistics beside them;
`stats_from_dataframe(df, metadata)` rebuilds the (sparse) statistics so files merge exactly.
Experts are stored sparsely: `expert_ids` lists the experts a token was routed to, and
`top1_counts` / `topk_counts` / `topk_weight_sums` are aligned with it.
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
from .streaming_stats import StreamingTokenStats, decode_set_ids


def _fixed_lists(arr_NX: np.ndarray, typ: pa.DataType) -> pa.Array:
    n, x = arr_NX.shape
    offsets = pa.array(np.arange(0, n * x + 1, x, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(arr_NX.reshape(-1), type=typ))


def token_strings(tokenizer: Any, token_ids: np.ndarray) -> list[str | None]:
    if tokenizer is None:
        return [None] * len(token_ids)
    uniq, inv = np.unique(token_ids, return_inverse=True)
    decoded = tokenizer.batch_decode([[int(i)] for i in uniq])  # once per distinct id, not per row
    return [decoded[j] for j in inv]


def _lists(offsets_N1: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets_N1.astype(np.int32)), pa.array(values, type=typ))


def _first_max(group_C: torch.Tensor, value_C: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (entries sorted by group, then key): the largest value and the position of its first entry."""
    best = torch.zeros(n, dtype=value_C.dtype).scatter_reduce(0, group_C, value_C, "amax", include_self=False)
    pos_C = torch.arange(value_C.numel())
    cand = torch.where(value_C == best[group_C], pos_C, torch.full_like(pos_C, value_C.numel()))
    first = torch.full((n,), value_C.numel(), dtype=torch.long).scatter_reduce(0, group_C, cand, "amin")
    return best, first


def stats_to_dataframe(stats: StreamingTokenStats, tokenizer: Any = None):
    st = stats.state_dict()
    L, E, K = stats.num_layers, stats.num_experts, stats.top_k
    count_R = st["row_count"]
    tok_R = st["token_R"].repeat_interleave(L)  # statistic row r = token_row * L + slot
    slot_R = torch.arange(L).repeat(st["token_R"].numel())
    seen = (count_R > 0).nonzero().squeeze(1)
    seen = seen[torch.argsort(slot_R[seen] * stats.vocab_size + tok_R[seen])]  # rows ordered by (layer, token)
    N = seen.numel()
    pos_R = torch.full((count_R.numel(),), -1, dtype=torch.long)
    pos_R[seen] = torch.arange(N)
    slot_N, tok_N, freq = slot_R[seen], tok_R[seen], count_R[seen]
    freq_d = freq.double()
    # cells of each output row, ordered by (row, expert)
    keys = st["cell_keys"]
    cell_row, cell_e = pos_R[keys // E], keys % E
    order = torch.argsort(cell_row * E + cell_e)
    cell_row, cell_e = cell_row[order], cell_e[order]
    top1_C, topk_C, w_C = st["cell_top1"][order], st["cell_topk"][order], st["cell_topk_w"][order]
    cell_off = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(cell_row, minlength=N).cumsum(0)])
    top1_best, top1_first = _first_max(cell_row, top1_C, N)  # ties: lowest expert index
    top_expert = cell_e[top1_first]
    # sets of each output row, ordered by (row, set id); the modal set is the first of the largest count
    set_rowR, set_id = stats._split_set_keys(stats.sets.keys)
    set_row = pos_R[set_rowR.cpu()]
    set_id = set_id.cpu()
    live = set_row >= 0
    set_row, set_id, set_count = set_row[live], set_id[live], st["set_count"][live]
    by_id = torch.argsort(set_id, stable=True)
    order = by_id[torch.argsort(set_row[by_id], stable=True)]  # (row, set id) order
    set_row, set_id, set_count = set_row[order], set_id[order], set_count[order]
    set_off = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(set_row, minlength=N).cumsum(0)])
    has_set = set_off[1:] > set_off[:-1]
    modal_count, first = _first_max(set_row, set_count, N)
    modal_NK = decode_set_ids(set_id[first.clamp_max(max(set_id.numel() - 1, 0))], E, K) if set_id.numel() else \
        torch.zeros(N, K, dtype=torch.long)
    modal_NK = torch.where(has_set[:, None], modal_NK, torch.full_like(modal_NK, -1))
    in_modal = (cell_e[:, None] == modal_NK[cell_row]).any(dim=1)
    overlap = torch.zeros(N, dtype=torch.long).index_add_(0, cell_row, topk_C * in_modal).double() / (K * freq_d)
    rows = {n: st[f"row_{n}"][seen] for n in ("mean_entropy", "m2_entropy", "mean_confidence", "m2_confidence", "sum_margin")}
    layer_ids = torch.tensor(stats.layer_ids, dtype=torch.long)[slot_N]
    c_off, s_off = cell_off.numpy(), set_off.numpy()
    cols: dict[str, Any] = {
        "layer": pa.array(layer_ids.numpy().astype(np.int32)),
        "token_id": pa.array(tok_N.numpy().astype(np.int32)),
        "token_str": pa.array(token_strings(tokenizer, tok_N.numpy()), type=pa.string()),
        "frequency": pa.array(freq.numpy().astype(np.int64)),
        "mean_entropy": pa.array(rows["mean_entropy"].numpy()),
        "std_entropy": pa.array((rows["m2_entropy"] / freq_d).clamp_min(0).sqrt().numpy()),
        "mean_confidence": pa.array(rows["mean_confidence"].numpy()),
        "std_confidence": pa.array((rows["m2_confidence"] / freq_d).clamp_min(0).sqrt().numpy()),
        "mean_margin": pa.array((rows["sum_margin"] / freq_d).numpy()),
        "expert_ids": _lists(c_off, cell_e.numpy().astype(np.int32), pa.int32()),
        "top1_counts": _lists(c_off, top1_C.numpy().astype(np.int64), pa.int64()),
        "topk_counts": _lists(c_off, topk_C.numpy().astype(np.int64), pa.int64()),
        "topk_weight_sums": _lists(c_off, w_C.numpy(), pa.float64()),
        "top_expert": pa.array(top_expert.numpy().astype(np.int32)),
        "routing_consistency": pa.array((top1_best.double() / freq_d).numpy()),
        "modal_topk_set": _fixed_lists(modal_NK.numpy().astype(np.int32), pa.int32()),
        "modal_set_count": pa.array(modal_count.numpy().astype(np.int64)),
        "topk_overlap": pa.array(overlap.numpy()),
        "m2_entropy": pa.array(rows["m2_entropy"].numpy()),
        "m2_confidence": pa.array(rows["m2_confidence"].numpy()),
        "sum_margin": pa.array(rows["sum_margin"].numpy()),
        "topk_set_ids": _lists(s_off, set_id.numpy().astype(np.int64), pa.int64()),
        "topk_set_counts": _lists(s_off, set_count.numpy().astype(np.int64), pa.int64()),
    }
    table = pa.Table.from_pydict(cols, schema=STATS_SCHEMA)
    return table.to_pandas()


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, copy=True))  # pandas may hand out read-only buffers


def _flat(column: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (lengths per row, concatenated values)."""
    if len(column) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=dtype)
    lengths = column.map(len).to_numpy().astype(np.int64)
    return lengths, np.concatenate(column.to_numpy()).astype(dtype) if lengths.sum() else np.zeros(0, dtype=dtype)


def stats_from_dataframe(df: Any, metadata: dict[str, Any], device: str | torch.device = "cpu") -> StreamingTokenStats:
    """Rebuild the statistics of a file (exactly: raw sums, counts and M2 are stored; the per-set
    lossy-counting deltas are not, so every set keeps the file's error bound as its delta)."""
    try:
        layers = [int(x) for x in metadata["layers"]]
        V, E, K = int(metadata["vocab_size"]), int(metadata["num_experts"]), int(metadata["top_k"])
    except KeyError as exc:
        raise InvalidInputError(f"statistics metadata lacks {exc.args[0]!r}") from None
    sets_meta = metadata.get("sets") or {}
    stats = StreamingTokenStats(len(layers), V, E, K, device="cpu", layer_ids=layers,
                                **({"set_capacity": int(sets_meta["capacity"])} if "capacity" in sets_meta else {}))
    L = len(layers)
    slot_of = np.full(max(layers) + 1, -1, dtype=np.int64)
    slot_of[layers] = np.arange(L)
    layer_N = df["layer"].to_numpy().astype(np.int64)
    if len(df) and (layer_N.max() >= len(slot_of) or (slot_of[layer_N] < 0).any()):
        raise InvalidInputError(f"rows name layers outside the metadata's layers {layers}")
    tok_N = df["token_id"].to_numpy().astype(np.int64)
    if len(df) and (tok_N.min() < 0 or tok_N.max() >= V):
        raise InvalidInputError(f"rows name token ids outside the vocabulary of {V}")
    token_R, tr_N = np.unique(tok_N, return_inverse=True)
    row_N = torch.from_numpy(tr_N.reshape(-1) * L + slot_of[layer_N])
    R = token_R.size * L
    state: dict[str, torch.Tensor] = {"token_R": torch.from_numpy(token_R)}
    for name, col, dtype in (("count", "frequency", np.int64), ("mean_entropy", "mean_entropy", np.float64),
                             ("m2_entropy", "m2_entropy", np.float64), ("mean_confidence", "mean_confidence", np.float64),
                             ("m2_confidence", "m2_confidence", np.float64), ("sum_margin", "sum_margin", np.float64)):
        t = torch.zeros(R, dtype=torch.long if dtype is np.int64 else torch.float64)
        state[f"row_{name}"] = t.index_copy_(0, row_N, _tensor(df[col].to_numpy().astype(dtype)))
    lengths, experts = _flat(df["expert_ids"], np.int64)
    cell_row = row_N.repeat_interleave(torch.from_numpy(lengths))
    state["cell_keys"] = cell_row * E + torch.from_numpy(experts)
    for name, col, dtype in (("top1", "top1_counts", np.int64), ("topk", "topk_counts", np.int64),
                             ("topk_w", "topk_weight_sums", np.float64)):
        lens, values = _flat(df[col], dtype)
        if not np.array_equal(lens, lengths):
            raise InvalidInputError(f"column {col!r} does not match expert_ids row by row")
        state[f"cell_{name}"] = torch.from_numpy(values)
    lengths, set_ids = _flat(df["topk_set_ids"], np.int64)
    _, set_counts = _flat(df["topk_set_counts"], np.int64)
    err = int(sets_meta.get("error_bound", 0))
    set_row = row_N.repeat_interleave(torch.from_numpy(lengths))
    set_id = torch.from_numpy(set_ids)
    if stats.direct_sets:
        state["set_dict"], state["set_keys"] = torch.zeros(0, dtype=torch.long), set_row * stats.num_sets + set_id
    else:
        uniq, inv = torch.unique(set_id, return_inverse=True)
        state["set_dict"], state["set_keys"] = uniq, set_row * (1 << 31) + inv
    state["set_count"] = torch.from_numpy(set_counts)
    state["set_delta"] = torch.full_like(state["set_count"], err)
    state["set_err"] = torch.tensor([err])
    consecutive = metadata.get("consecutive", {})
    for key, field in (("pairs_L", "pairs"), ("same_top1_L", "same_top1"), ("in_top2_L", "in_top2"),
                       ("share_top2_L", "share_top2")):
        state[key] = torch.tensor([int(consecutive.get(str(layer), {}).get(field, 0)) for layer in layers], dtype=torch.long)
    if torch.device(device) != torch.device("cpu"):
        stats.device = torch.device(device)
        stats._binom = stats._binom.to(device)
    stats.load_state_dict(state)
    return stats
