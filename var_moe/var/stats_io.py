"""Reading Phase 1 statistics files for table building, and checking they fit a model.

`read_stats` returns `(DataFrame, metadata dict)`: through `var_moe.capture.schema.read_stats` for
files that carry var-moe run metadata, else (e.g. a vocabulary analysis saved with
`DataFrame.to_parquet`) with pyarrow, decoding the key-value metadata (JSON values).
`read_stats_for_model` also refuses statistics captured from another architecture, vocabulary,
expert count or top-k, or on the test split. Test: `pytest tests/test_var_tables.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

REQUIRED_COLUMNS = ("layer", "token_id", "frequency", "mean_entropy", "modal_topk_set", "modal_set_count",
                    "expert_ids", "topk_counts", "topk_weight_sums")


def read_stats_metadata(path: str | Path) -> dict[str, Any]:
    """The key-value metadata of a Parquet statistics file, JSON values decoded."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"routing statistics file {p} does not exist (run `varmoe capture` first)")
    try:
        raw = pq.read_schema(p).metadata or {}
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise InvalidInputError(f"{p} is not a readable Parquet statistics file ({exc})") from exc
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        key, text = k.decode("utf-8", "replace"), v.decode("utf-8", "replace")
        if key in ("pandas", "ARROW:schema"):
            continue
        try:
            meta[key] = json.loads(text)
        except json.JSONDecodeError:
            meta[key] = text
    for nest in ("varmoe", "var_moe", "metadata"):  # a schema module may nest everything under one key
        if isinstance(meta.get(nest), dict):
            meta = {**meta, **meta[nest]}
    return meta


def read_stats(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """`(DataFrame, metadata)` of a Phase 1 statistics file, with the columns tables need checked."""
    import pyarrow.parquet as pq

    from ..capture.schema import read_stats as capture_read_stats

    p = Path(path)
    meta = read_stats_metadata(p)
    if meta.get("schema_version") is not None:  # written by the Phase 1 schema module
        df, meta = capture_read_stats(p)
        meta = dict(meta or {})
    else:
        df = pq.read_table(p).to_pandas()
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InvalidInputError(f"{p}: statistics file lacks column(s) {missing}; is it a Phase 1 `varmoe capture` output?")
    return df, meta


def model_shape(model: Any, adapter: Any) -> dict[str, Any]:
    """The identity fields statistics, evidence and tables are checked against: architecture, V, E, k."""
    return {"model_type": getattr(model.config, "model_type", None), "vocab_size": int(model.config.vocab_size),
            "num_experts": adapter.num_experts, "top_k": adapter.top_k}


def read_stats_for_model(path: str | Path, model: Any, adapter: Any,
                         allow_test_split: bool) -> tuple[Any, dict[str, Any]]:
    """`read_stats`, refusing statistics made for another architecture / vocabulary / E / k (fields
    absent are not checked) or, unless allowed, captured on the test split (`check_split`)."""
    df, meta = read_stats(path)
    for key, want in model_shape(model, adapter).items():
        got = meta.get(key)
        if got is not None and want is not None and got != want:
            raise InvalidInputError(f"statistics {path} were made for {key}={got!r} but the model has {key}={want!r}; "
                                    f"capture statistics / build tables for this model (source model: "
                                    f"{meta.get('model')!r})")
    check_split(meta, str(path), allow_test_split)
    return df, meta


def named_documents(meta: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(dataset, split, max_length, num_samples) as a capture's metadata names them (None where absent):
    top-level fields, else those of its run `config`."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    return (meta.get("dataset") or cfg.get("dataset"), meta.get("split") or cfg.get("split"),
            cfg.get("max_length") or meta.get("max_length"), cfg.get("num_samples"))


def names_documents(meta: dict[str, Any]) -> bool:
    """Whether a capture's metadata names its documents (dataset, split, max_length)."""
    return all(named_documents(meta)[:3])


def stats_documents(meta: dict[str, Any]) -> tuple[str, str, int, int | None]:
    """(dataset, split, max_length, num_samples) of the documents a capture's metadata names."""
    if not names_documents(meta):
        raise InvalidInputError("the statistics metadata does not name its dataset / split / max_length, so its "
                                "documents cannot be found again to certify tables by document; capture them with "
                                "`varmoe capture`, or build tables with `VARTables.from_texts` / `varmoe build-tables`")
    dataset, split, max_length, num_samples = named_documents(meta)
    return dataset, split, int(max_length), num_samples


def check_split(meta: dict[str, Any], source: str, allow_test_split: bool) -> None:
    """Refuse statistics of the test split: tables built there would be judged on their own data."""
    if named_documents(meta)[1] == "test" and not allow_test_split:
        raise InvalidInputError(f"{source}: these statistics were captured on the 'test' split, which the evaluation "
                                "scores; capture `--split calibration` for tables, or pass --allow-test-split to "
                                "build on it anyway")
