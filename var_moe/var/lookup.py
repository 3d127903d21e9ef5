"""`Lookup`: the fast tier of one forward for every layer, as the routers read it (stack.py makes
it; one_row.py has the one-row kinds). Test: `pytest tests/test_var_router.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Lookup:
    """The fast tier of one forward, for every layer (rows in router order)."""

    tokens: Any  # the TokenBatch it was computed for (identity marks the forward)
    safe_T: torch.Tensor  # token id, 0 where out of vocabulary
    valid_T: torch.Tensor
    fast_LT: torch.Tensor  # served from a table: token entry, or (previous, token) entry where the token has none
    nominal_LTK: torch.Tensor  # table set (before adaptive k), for verification
    idx_LTK: torch.Tensor  # served set (after adaptive k)
    w_LTK: torch.Tensor  # served weights, scaled like the router's
    # per layer, whether any row is fast: known on the host for CPU tensors only (reading it there
    # is no device sync), None on accelerators
    any_L: list[bool] | None = None
    pair_LT: torch.Tensor | None = None  # the rows of fast_LT served by a pair entry (None: no pair entries)
