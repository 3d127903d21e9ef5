"""The routing-trace Parquet schema: one row per decoded token, in stream order.

Columns (L = traced MoE layers, K = top-k, flattened layer-major into lists of length L*K):
- `seq_id` (int32): sequence the token belongs to; sequences follow one another in the stream,
- `position` (int32): position of the token within its sequence (0 = first),
- `token_id` (int32),
- `experts_LK` (list<int16>): the experts the router chose at every layer, top expert first,
- `top_probs_LK` (list<float32>): the router probability of each chosen expert (NaN if unknown,
  e.g. a trace loaded from a routing array that has ids only),
- `spec_experts_LK` (list<int16>): the speculative prediction of each layer's experts: layer l's
  router applied to the hidden state entering layer l-1's MoE block (-1 where there is none:
  layer 0, or a trace without it).

Run metadata (model, dataset, split, layers, num_experts, top_k, source, library versions) is one
JSON document under the key `var_moe` of the file's key-value metadata, as in
`var_moe/capture/schema.py`. Test: `pytest tests/test_offload_trace.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..capture.schema import METADATA_KEY, StatsFileError

TRACE_SCHEMA_VERSION = 1

TRACE_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int32()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("experts_LK", pa.list_(pa.int16())),
        ("top_probs_LK", pa.list_(pa.float32())),
        ("spec_experts_LK", pa.list_(pa.int16())),
    ]
)
TRACE_COLUMNS = tuple(TRACE_SCHEMA.names)
REQUIRED_METADATA = ("layers", "num_experts", "top_k")


class TraceFileError(StatsFileError):
    """A trace file is missing, unreadable or has the wrong schema; the message names it."""


def _list_column(values_TX: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    t, width = values_TX.shape
    offsets = pa.array(np.arange(0, (t + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values_TX.reshape(-1), type=typ))


def write_trace_table(columns: dict[str, np.ndarray], path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write a trace from arrays: seq_id/position/token_id (T,) and experts/top_probs/spec (T, L*K)."""
    path = Path(path)
    arrays = [
        pa.array(columns["seq_id"].astype(np.int32)),
        pa.array(columns["position"].astype(np.int32)),
        pa.array(columns["token_id"].astype(np.int32)),
        _list_column(columns["experts_LK"].astype(np.int16), pa.int16()),
        _list_column(columns["top_probs_LK"].astype(np.float32), pa.float32()),
        _list_column(columns["spec_experts_LK"].astype(np.int16), pa.int16()),
    ]
    doc = {"schema_version": TRACE_SCHEMA_VERSION, "kind": "routing-trace", **metadata}
    table = pa.Table.from_arrays(arrays, schema=TRACE_SCHEMA).replace_schema_metadata(
        {METADATA_KEY: json.dumps(doc, sort_keys=True, default=str).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)  # atomic, as the statistics writer
    return path


def _flat(table: pa.Table, name: str, width: int, dtype: Any, path: Path) -> np.ndarray:
    col = table.column(name).combine_chunks()
    lengths = col.value_lengths().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, dtype=np.int64)
    if len(col) and (col.null_count or not np.all(lengths == width)):
        raise TraceFileError(f"{path}: column {name!r} must hold lists of length {width} (layers x top-k) in every row")
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(col), width)


def read_trace_table(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`(columns, metadata)` of a trace file; a wrong file gets a TraceFileError naming it."""
    path = Path(path)
    if not path.exists():
        raise TraceFileError(f"{path}: no such trace file (record one with `varmoe trace`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TraceFileError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in TRACE_COLUMNS if c not in table.column_names]
    if missing:
        raise TraceFileError(f"{path}: not a var-moe trace file, missing columns {missing}")
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    meta = json.loads(raw) if raw else None
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_METADATA):
        raise TraceFileError(f"{path}: no var-moe trace metadata ({', '.join(REQUIRED_METADATA)}) in the file")
    width = len(meta["layers"]) * int(meta["top_k"])
    cols = {
        "seq_id": table.column("seq_id").to_numpy().astype(np.int32),
        "position": table.column("position").to_numpy().astype(np.int32),
        "token_id": table.column("token_id").to_numpy().astype(np.int32),
        "experts_LK": _flat(table, "experts_LK", width, np.int16, path),
        "top_probs_LK": _flat(table, "top_probs_LK", width, np.float32, path),
        "spec_experts_LK": _flat(table, "spec_experts_LK", width, np.int16, path),
    }
    return cols, meta
