"""Reading VAR's safetensors artifacts (tables, evidence): tensors plus a JSON metadata entry.

One reader for every such file, so each refuses a foreign or corrupt file the same way: a missing
file is FileNotFoundError (with the caller's hint), an unreadable one or one without the expected
metadata entry is InvalidInputError naming the file. No pickle: safetensors + JSON only.
Test: `pytest tests/test_var_tables.py` (tables and evidence round trips, refusals).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError


def read_artifact(path: str | Path, key: str, what: str, hint: str = "") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of the safetensors file at `path` whose metadata entry `key` holds JSON."""
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} file {p} does not exist{f' ({hint})' if hint else ''}")
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(key, "null"))
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:
        raise InvalidInputError(f"{p} is not a {what} file ({exc})") from exc
    if not isinstance(meta, dict):
        raise InvalidInputError(f"{p} has no {what} metadata")
    return meta, tensors
