"""Test helper: compare two statistics frames column by column (used by the capture tests).

Run: imported by tests/test_capture_*.py and tests/test_remote_capture.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def compare_stats(a: Any, b: Any, rtol: float = 0.0, atol: float = 0.0) -> list[str]:
    """Columns in which two statistics frames differ (integers and lists of ints exactly, floats to rtol/atol).

    Rows are matched on (layer, token_id) / (layer, prev_token_id, token_id). An empty list means equal.
    """
    keys = [k for k in ("layer", "prev_token_id", "token_id") if k in a.columns]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    if list(a.columns) != list(b.columns):
        return ["<columns>"]
    if a[keys].values.tolist() != b[keys].values.tolist():
        return ["<rows>"]
    bad = []
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if col == "token_str":
            same = a[col].fillna("<null>").tolist() == b[col].fillna("<null>").tolist()
        elif x.dtype == object:  # list columns: one array (or None) per row
            nx = [None if v is None else np.asarray(v) for v in x]
            ny = [None if v is None else np.asarray(v) for v in y]
            same = all((u is None and v is None) or (u is not None and v is not None and u.shape == v.shape and
                       (np.allclose(u, v, rtol=rtol, atol=atol) if u.dtype.kind == "f" else np.array_equal(u, v)))
                       for u, v in zip(nx, ny))
        elif x.dtype.kind == "f":
            same = np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
        else:
            same = np.array_equal(x, y)
        if not same:
            bad.append(col)
    return bad
