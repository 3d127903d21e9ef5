"""`forward_cost_shares` on a tiny model: every category timed, shares of one forward that add up
to 1 with `other`, and no hook left behind. Run: `pytest tests/test_profiling.py`."""

import pytest
import torch

from var_moe.profiling import CATEGORIES, forward_cost_shares
from var_moe.tiny import tiny_model

torch.set_num_threads(1)


def test_shares_cover_the_forward_and_hooks_are_removed():
    model = tiny_model("mixtral", seed=0)
    ids = torch.randint(3, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    out = forward_cost_shares(model, ids, repeats=3)
    shares = out["shares"]
    assert set(shares) == {*CATEGORIES, "other"}
    assert all(0 < shares[c] < 1 for c in CATEGORIES)  # each category's modules ran inside the timed forward
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.05)  # medians of shares: close to 1, not exact
    assert out["tokens"] == 32 and out["repeats"] == 3 and out["forward_seconds_median"] > 0
    mods = [m for m in model.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in mods)
