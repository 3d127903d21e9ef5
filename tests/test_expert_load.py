"""Expert-load counters (var_moe/expert_load.py) and the builtin model's tap (var_moe/routing_tap.py)
against brute-force recomputations: counts per (layer, expert) over valid rows only, entropy from
the router's own probabilities, window statistics and their sliding window."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from var_moe.adapters import get_adapter
from var_moe.expert_load import ExpertLoad, LoadReading, LoadWindow, window_stats
from var_moe.routing_tap import RoutingTap
from var_moe.tiny import tiny_model


def brute(model, ids_BS, mask_BS):
    """(counts_LE, entropy_L, tokens) of one forward from hooks on the original routers."""
    adapter = get_adapter(model)
    moe = adapter.moe_layers(model)
    outs = {}
    handles = [m.router.register_forward_hook(lambda mod, a, o, l=m.layer: outs.__setitem__(l, o)) for m in moe]
    with torch.no_grad():
        model(input_ids=ids_BS, attention_mask=mask_BS)
    for h in handles:
        h.remove()
    valid = mask_BS.reshape(-1).bool().numpy()
    e = adapter.num_experts
    counts = np.zeros((len(moe), e), np.int64)
    ent = np.zeros(len(moe))
    for s, m in enumerate(moe):
        logits, _, idx = outs[m.layer]
        idx = idx.reshape(-1, idx.shape[-1]).numpy()
        for row, ok in zip(idx, valid):  # brute force: a loop over rows
            if ok:
                for x in row:
                    counts[s, x] += 1
        p = adapter.probabilities(logits.reshape(-1, e)).double().numpy()
        for row, ok in zip(p, valid):
            if ok:
                ent[s] += -sum(v * math.log(v) for v in row if v > 0)
    return counts, ent, int(valid.sum())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_tap_counts_equal_brute_force_over_valid_rows(family):
    model = tiny_model(family, seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    counts, ent, tokens = brute(model, ids, mask)
    ids2 = ids[:2, 2:]  # another shape, no padding, no mask given
    counts2, ent2, tokens2 = brute(model, ids2, torch.ones_like(ids2))
    tap = RoutingTap(model).attach()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    r = tap.read()
    np.testing.assert_array_equal(r.counts_LE, counts)
    np.testing.assert_allclose(r.entropy_L, ent, rtol=1e-5)
    assert (r.tokens_L == tokens).all()
    # forwards filed together (masked and unmasked, two shapes) are counted as the sum
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids2)
        model(input_ids=ids, attention_mask=mask)
    r = tap.read()
    np.testing.assert_array_equal(r.counts_LE, 3 * counts + counts2)
    np.testing.assert_allclose(r.entropy_L, 3 * ent + ent2, rtol=1e-5)
    assert (r.tokens_L == 3 * tokens + tokens2).all()
    # filing past flush_forwards counts on the engine's side without a read
    tap.flush_forwards = 2
    with torch.no_grad():
        model(input_ids=ids2)
        model(input_ids=ids2)
    assert not tap._masks
    np.testing.assert_array_equal(tap.load.read().counts_LE, 3 * counts + 3 * counts2)
    tap.detach()  # detaching stops counting
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    np.testing.assert_array_equal(tap.read().counts_LE, 3 * counts + 3 * counts2)


def test_tap_records_the_experts_of_the_last_forward():
    model = tiny_model("mixtral", seed=2)
    tap = RoutingTap(model, count=False).attach()
    tap.recording = True
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    seen = {}
    moe = get_adapter(model).moe_layers(model)
    handles = [m.router.register_forward_hook(lambda mod, a, o, l=m.layer: seen.__setitem__(l, o[2])) for m in moe]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    assert tap.load is None
    assert tap.last_LTK.shape == (len(moe), 10, 2)
    for s, m in enumerate(moe):
        assert torch.equal(tap.last_LTK[s], seen[m.layer].reshape(10, 2))


def test_count_forward_against_brute_force_with_tiers():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 5, (2, 9, 2), generator=g)  # 4 experts + the empty slot 4
    idx[..., 1] = torch.where(idx[..., 1] == idx[..., 0], (idx[..., 0] + 1) % 5, idx[..., 1])  # distinct per row
    ent = torch.rand(2, 9, generator=g)
    valid = torch.rand(9, generator=g) > 0.3
    tier = torch.tensor([[0, 1, -1, 0, 1, 1, 0, -1, 0], [1, 1, -1, 0, 0, 1, 0, -1, 1]])
    load = ExpertLoad(2, 4, tiers=("fast", "learned"))
    load.count_forward(idx, ent, valid, tier)
    r = load.read()
    want = np.zeros((2, 5), np.int64)  # the empty slot's column too (read() leaves it out)
    want_tier = np.zeros((2, 2, 4), np.int64)
    for s in range(2):
        for t in range(9):
            if valid[t]:
                for e in idx[s, t].tolist():
                    want[s, e] += 1
                    if e < 4 and tier[s, t] >= 0:
                        want_tier[tier[s, t], s, e] += 1
    np.testing.assert_array_equal(load.counts_X[: load.bins].view(load.groups, 2, 5).sum(0).numpy(), want)
    np.testing.assert_array_equal(r.counts_LE, want[:, :4])
    np.testing.assert_allclose(r.entropy_L, (ent * valid).sum(1).double().numpy())
    np.testing.assert_array_equal(r.tokens_L, [int(valid.sum())] * 2)
    np.testing.assert_array_equal(r.tier_counts_XLE, want_tier)


def test_window_statistics_and_sliding():
    counts = np.array([[6, 2, 0, 0], [2, 2, 2, 2]])
    st = window_stats(LoadReading(counts, np.array([4.0, 2.0]), np.array([4, 4])))
    np.testing.assert_allclose(st.imbalance_L, [6 / 2, 1.0])
    np.testing.assert_allclose(st.hottest_share_L, [6 / 8, 2 / 8])
    np.testing.assert_array_equal(st.dead_L, [2, 0])
    np.testing.assert_allclose(st.entropy_L, [1.0, 0.5])
    now = [0.0]
    w = LoadWindow(10.0, clock=lambda: now[0])
    r = lambda c, n: LoadReading(np.array([c]), np.array([0.0]), np.array([n]))  # noqa: E731
    assert w.update(r([1, 0], 1)).counts_LE.tolist() == [[1, 0]]  # first reading: since the start
    now[0] = 5.0
    assert w.update(r([3, 0], 3)).counts_LE.tolist() == [[2, 0]]
    now[0] = 16.0  # the reading at 5 s is the newest one at least 10 s old: the window starts there
    st = w.update(r([3, 4], 7))
    assert st.counts_LE.tolist() == [[0, 4]] and st.dead_L.tolist() == [1]
    now[0] = 17.0
    st = w.update(r([3, 4], 7))  # nothing new since 16 s, but the window still holds 5 s -> 16 s
    assert st.counts_LE.tolist() == [[0, 4]]
    now[0] = 40.0
    st = w.update(r([3, 4], 7))
    assert st.tokens_L.tolist() == [0] and math.isnan(st.imbalance_L[0]) and st.dead_L.tolist() == [2]


def test_tap_counts_per_var_tier_equal_brute_force(reference_model_dir):
    """With tiers, a VAR-mode forward's rows count as fast where the tables served them and learned
    elsewhere, a baseline forward's rows in no tier; the totals keep every row."""
    from var_moe.loading import load_model
    from var_moe.var.config import VARConfig
    from var_moe.var.served import TIERS
    from var_moe.var.tables import VARTables
    from var_moe.var.wrapper import VARModelWrapper

    model, tok = load_model(str(reference_model_dir), dtype="float32")
    tables = VARTables.load(reference_model_dir / "var" / "var_tables.safetensors")
    ids = torch.tensor([tok("def forward(self, x):\n    return self.linear(x) + 1")["input_ids"]])
    with VARModelWrapper(model, VARConfig(), tables=tables) as w:
        tap = RoutingTap.for_wrapper(model, w)
        tap.recording = True
        tap.attach()
        want = np.zeros((len(TIERS), len(tap.moe), tap.num_experts), np.int64)
        total = np.zeros((len(tap.moe), tap.num_experts), np.int64)
        for var in (True, False, True):
            w.enable_var() if var else w.disable_var()
            with torch.no_grad():
                model(input_ids=ids)
            idx, fast = tap.last_LTK.numpy(), tap.last_fast_LT
            assert (fast is not None) == var
            for s in range(idx.shape[0]):  # brute force: loops over rows
                for r in range(idx.shape[1]):
                    for e in idx[s, r]:
                        total[s, e] += 1
                        if var:
                            want[0 if bool(fast[s, r]) else 1, s, e] += 1
        r = tap.read()
        tap.detach()
    np.testing.assert_array_equal(r.counts_LE, total)
    np.testing.assert_array_equal(r.tier_counts_XLE, want)
    assert want[0].sum() > 0 and want[1].sum() > 0  # both tiers were seen


def test_var_router_sink_files_what_a_forward_hook_sees(reference_model_dir):
    """On VAR's router the tap files outputs through `output_sink` instead of a hook; a second tap on
    the same routers gets hooks. Both see the same experts and count the same, and detaching leaves
    neither a sink nor a hook behind."""
    from var_moe.loading import load_model
    from var_moe.var.config import VARConfig
    from var_moe.var.tables import VARTables
    from var_moe.var.wrapper import VARModelWrapper

    model, tok = load_model(str(reference_model_dir), dtype="float32")
    tables = VARTables.load(reference_model_dir / "var" / "var_tables.safetensors")
    ids = torch.tensor([tok("import torch\nfrom torch import nn\n\nclass Block(nn.Module):")["input_ids"]])
    with VARModelWrapper(model, VARConfig(), tables=tables) as w:
        w.enable_var()
        first, second = RoutingTap(model), RoutingTap(model)
        routers = [getattr(m.block, m.router_attr) for m in first.moe]
        first.attach()
        second.attach()
        assert all(r.output_sink == first._on_output and len(r._forward_hooks) == 1 for r in routers)
        first.recording = second.recording = True
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids)
        assert torch.equal(first.last_LTK, second.last_LTK)
        a, b = first.read(), second.read()
        np.testing.assert_array_equal(a.counts_LE, b.counts_LE)
        assert a.counts_LE.sum() == 3 * ids.numel() * len(routers) * first.top_k
        first.detach()
        second.detach()
        assert all(r.output_sink is None and not r._forward_hooks for r in routers)


def test_padding_rows_count_nothing_even_with_nan_entropy():
    """Padding rows (CUDA-graph padding: garbage hidden states) may carry NaN entropy; they must not
    reach any counter."""
    idx = torch.tensor([[[0, 1], [2, 3], [1, 2]]])  # 1 layer, 3 rows, k = 2
    ent = torch.tensor([[0.5, float("nan"), 0.25]])
    valid = torch.tensor([True, False, True])
    load = ExpertLoad(1, 4)
    load.count_forward(idx, ent, valid)
    r = load.read()
    np.testing.assert_array_equal(r.counts_LE, [[1, 2, 1, 0]])
    np.testing.assert_array_equal(r.tokens_L, [2])
    np.testing.assert_allclose(r.entropy_L, [0.75])
