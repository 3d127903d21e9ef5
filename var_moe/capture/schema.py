"""The Phase 1 Parquet schema: one row per (layer, token_id), plus the pair-statistics sidecar.

Contract columns (docs/ARCHITECTURE.md; entropies in nats, the maximum ln E is in the metadata):
`layer`, `token_id`, `token_str`, `frequency`, `mean_entropy`, `std_entropy`, `mean_confidence`,
`std_confidence`, `mean_margin`, `expert_ids`, `top1_counts`, `topk_counts`, `topk_weight_sums`,
`top_expert`, `routing_consistency`, `modal_topk_set`[K], `modal_set_count`, `topk_overlap`.

Experts are stored sparsely: `expert_ids` lists (ascending) the experts the token was routed to
(in its top-k at least once), and the three count/weight lists are aligned with it. `densify_experts`
turns a list column into a (rows, E) array where a reader needs one. `modal_topk_set` is the most
frequent counted top-k set (ties: smallest combinatorial id) and `modal_set_count` its count; set
counts are exact when the metadata's `sets.error_bound` is 0 (else lower bounds, lossy counting).
Files of schema version 1 (dense length-E lists) are converted on read.

Extra columns carry the raw sufficient statistics so that files merge exactly
(`varmoe merge-stats`): `m2_entropy`, `m2_confidence` (Welford sums of squared deviations),
`sum_margin`, and `topk_set_ids` / `topk_set_counts` (every top-k set counted for the token, as
combinatorial-number-system ids, with its count).
`std_*` are population standard deviations sqrt(M2 / frequency).

Run metadata is one JSON document under the key `var_moe` of the file's key-value metadata.

The sidecar `<stem>.pairs.parquet` holds (layer, prev_token_id, token_id) rows of the context
statistics (see `var_moe.capture.pairs`). Test: `pytest tests/test_capture_schema.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InvalidInputError

METADATA_KEY = b"var_moe"
SCHEMA_VERSION = 2

STATS_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("token_id", pa.int32()),
        ("token_str", pa.string()),
        ("frequency", pa.int64()),
        ("mean_entropy", pa.float64()),
        ("std_entropy", pa.float64()),
        ("mean_confidence", pa.float64()),
        ("std_confidence", pa.float64()),
        ("mean_margin", pa.float64()),
        ("expert_ids", pa.list_(pa.int32())),
        ("top1_counts", pa.list_(pa.int64())),
        ("topk_counts", pa.list_(pa.int64())),
        ("topk_weight_sums", pa.list_(pa.float64())),
        ("top_expert", pa.int32()),
        ("routing_consistency", pa.float64()),
        ("modal_topk_set", pa.list_(pa.int32())),
        ("modal_set_count", pa.int64()),
        ("topk_overlap", pa.float64()),
        # raw sufficient statistics for exact merging
        ("m2_entropy", pa.float64()),
        ("m2_confidence", pa.float64()),
        ("sum_margin", pa.float64()),
        ("topk_set_ids", pa.list_(pa.int64())),
        ("topk_set_counts", pa.list_(pa.int64())),
    ]
)
STATS_COLUMNS = tuple(STATS_SCHEMA.names)

PAIR_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("prev_token_id", pa.int32()),
        ("token_id", pa.int32()),
        ("frequency", pa.int64()),
        ("modal_topk_set", pa.list_(pa.int32())),
        ("modal_set_count", pa.int64()),
        ("max_undercount", pa.int64()),
        ("key_ids", pa.list_(pa.int64())),  # top-k set ids (mode "set") or expert ids (mode "expert")
        ("key_counts", pa.list_(pa.int64())),
    ]
)
PAIR_COLUMNS = tuple(PAIR_SCHEMA.names)


class StatsFileError(InvalidInputError):
    """A statistics file is missing, unreadable or has the wrong schema; the message names it."""


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"torch": torch.__version__, "transformers": transformers.__version__, "var_moe": __version__,
            "pyarrow": pa.__version__}


def pairs_path(stats_path: str | Path) -> Path:
    """Sidecar path of a statistics file: `stats.parquet` -> `stats.pairs.parquet`."""
    p = Path(stats_path)
    return p.with_name(f"{p.name[: -len('.parquet')] if p.name.endswith('.parquet') else p.name}.pairs.parquet")


def _to_table(df: Any, schema: pa.Schema, path: Path, metadata: dict[str, Any]) -> pa.Table:
    missing = [c for c in schema.names if c not in df.columns]
    if missing:
        raise StatsFileError(f"{path}: cannot write, the frame lacks columns {missing}")
    try:
        table = pa.Table.from_pandas(df[list(schema.names)], schema=schema, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StatsFileError(f"{path}: a column does not fit the schema ({exc})") from exc
    doc = {"schema_version": SCHEMA_VERSION, **metadata}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(doc, sort_keys=True, default=str).encode()})


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)  # atomic: a killed job never leaves a half-written file under the real name


def _canonical(typ: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(typ):
        return pa.string()
    if pa.types.is_large_list(typ) or pa.types.is_list(typ):
        return pa.list_(_canonical(typ.value_type))
    return typ


def _upgrade_v1(table: pa.Table) -> pa.Table:
    """Schema 1 stored E-long dense lists: keep each row's experts with a nonzero top-k count."""
    import numpy as np

    topk = table.column("topk_counts").combine_chunks()
    n_rows = len(topk)
    dense = np.asarray(topk.flatten().to_numpy(zero_copy_only=False), dtype=np.int64)
    width = dense.size // n_rows if n_rows else 0
    dense_NE = dense.reshape(n_rows, width)
    rows, experts = np.nonzero(dense_NE)
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))]).astype(np.int32))
    out = table
    for name, typ in (("top1_counts", pa.int64()), ("topk_counts", pa.int64()), ("topk_weight_sums", pa.float64())):
        vals = np.asarray(table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(n_rows, width)
        out = out.set_column(out.schema.get_field_index(name), name,
                             pa.ListArray.from_arrays(offsets, pa.array(vals[rows, experts], type=typ)))
    out = out.append_column("expert_ids", pa.ListArray.from_arrays(offsets, pa.array(experts.astype(np.int32))))
    for name in ("topk_set_ids", "topk_set_counts"):  # schema 1 wrote null when sets were not counted
        col = out.column(name).combine_chunks()
        if col.null_count:
            out = out.set_column(out.schema.get_field_index(name), name, col.fill_null(pa.array([], type=pa.int64())))
    return out


def _read(path: str | Path, schema: pa.Schema, what: str) -> tuple[Any, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise StatsFileError(f"{path}: no such {what} file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StatsFileError(f"{path}: not a readable Parquet file ({exc})") from exc
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if schema is STATS_SCHEMA and raw is not None and json.loads(raw).get("schema_version") == 1 \
            and "expert_ids" not in table.column_names and "topk_counts" in table.column_names:
        table = _upgrade_v1(table)
    missing = [c for c in schema.names if c not in table.column_names]
    if missing:
        raise StatsFileError(f"{path}: not a var-moe {what} file, missing columns {missing}")
    for field in schema:
        got = table.schema.field(field.name).type
        if _canonical(got) != field.type:
            raise StatsFileError(f"{path}: column {field.name!r} has type {got}, expected {field.type}")
        if got != field.type:  # large_string / large_list from other writers: same values
            table = table.set_column(table.schema.get_field_index(field.name), field.name,
                                     table.column(field.name).cast(field.type))
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise StatsFileError(f"{path}: no var-moe run metadata in the file")
    return table.to_pandas(), json.loads(raw)


def write_stats(df: Any, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write a (layer, token) statistics frame with its run metadata; returns the path."""
    path = Path(path)
    _write(_to_table(df, STATS_SCHEMA, path, metadata), path)
    return path


def read_stats(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """`(DataFrame, metadata)` of a statistics file; a wrong file gets a StatsFileError naming it."""
    return _read(path, STATS_SCHEMA, "statistics")


def densify_experts(df: Any, column: str, num_experts: int) -> Any:
    """A sparse per-expert list column (aligned with `expert_ids`) as a (rows, E) NumPy array."""
    import numpy as np

    lengths = df["expert_ids"].map(len).to_numpy() if len(df) else np.zeros(0, dtype=np.int64)
    values = df[column].to_numpy()
    dtype = np.float64 if column == "topk_weight_sums" else np.int64
    out = np.zeros((len(df), num_experts), dtype=dtype)
    if lengths.sum():
        rows = np.repeat(np.arange(len(df)), lengths)
        out[rows, np.concatenate(df["expert_ids"].to_numpy()).astype(np.int64)] = np.concatenate(values).astype(dtype)
    return out


def write_pairs(df: Any, path: str | Path, metadata: dict[str, Any]) -> Path:
    path = Path(path)
    _write(_to_table(df, PAIR_SCHEMA, path, metadata), path)
    return path


def read_pairs(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """`(DataFrame, metadata)` of a pair-statistics sidecar file."""
    return _read(path, PAIR_SCHEMA, "pair-statistics")
