"""Each VAR part in isolation, checked against brute-force expectations on tiny models:
fast (table sets and weights reach the experts), shadow verification and demotion, adaptive k,
learned-weight restriction, per-row counts. Run: `pytest tests/test_var_router.py`."""

import pytest
import torch
from scipy import stats as sps

from var_moe.adapters import get_adapter
from var_moe.capture.recorder import RoutingRecorder
from var_moe.tiny import tiny_model
from var_moe.var.config import VARConfig
from var_moe.var.tables import VARTables
from var_moe.var.wrapper import VARModelWrapper

torch.set_num_threads(1)
E, K = 4, 2


def table_with(model, layers, sets, weights=None, agree=1000.0, total=1000.0):
    """Tables where every token of the vocabulary is a member routed to sets[token % len(sets)]."""
    adapter = get_adapter(model)
    tables = VARTables.empty(model, adapter, layers)
    v = model.config.vocab_size
    sets_SK = torch.tensor(sets)
    w_SK = torch.tensor(weights if weights is not None else [[0.6, 0.4]] * len(sets))
    for l in layers:
        t = tables[l]
        pick = torch.arange(v) % len(sets)
        t.experts_VK[:] = sets_SK[pick]
        t.weights_VK[:] = w_SK[pick]
        t.member_V[:] = True
        t.bound_V[:] = 0.99
        t.agree_V[:] = agree
        t.total_V[:] = total
    return tables


def experts_inputs(model, layer):
    seen = []
    experts = model.model.layers[layer].mlp.experts
    h = experts.register_forward_pre_hook(lambda m, args: seen.append((args[1].clone(), args[2].clone())))
    return seen, h


def learned_layer0(model, ids, mask):
    out = {}
    with RoutingRecorder(model, callback=lambda l, tok, d: out.setdefault(l, d), layer_indices=[0]):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    return out[0]


def batch(seed=0, b=2, s=12, pad_row1=3):
    ids = torch.stack([torch.randperm(90, generator=torch.Generator().manual_seed(seed + i))[:s] + 3 for i in range(b)])
    mask = torch.ones_like(ids)
    if b > 1 and pad_row1:
        mask[1, :pad_row1] = 0
        ids[1, :pad_row1] = 0
    return ids, mask


def served_members(w: VARModelWrapper, layer: int) -> torch.Tensor:
    """(V,) bool: the tokens layer's table serves now (demotions applied)."""
    w.stack.apply_demotions()
    return w.stack.member_LV[w.stack.slot[layer]]


def test_fast_tier_sends_table_sets_and_weights_to_experts():
    model = tiny_model("mixtral", seed=0)
    tables = table_with(model, [0, 1], [[1, 3], [0, 2]], [[0.7, 0.3], [0.55, 0.45]])
    w = VARModelWrapper(model, VARConfig(), tables=tables)
    seen, h = experts_inputs(model, 0)
    ids, mask = batch()
    with torch.no_grad():
        w(input_ids=ids, attention_mask=mask)
    h.remove()
    idx_TK, w_TK = seen[0]
    valid = mask.reshape(-1).bool()
    flat = ids.reshape(-1)
    expect_idx = torch.where((flat % 2 == 0)[:, None], torch.tensor([1, 3]), torch.tensor([0, 2]))
    expect_w = torch.where((flat % 2 == 0)[:, None], torch.tensor([0.7, 0.3]), torch.tensor([0.55, 0.45]))
    assert torch.equal(idx_TK[valid], expect_idx[valid])
    torch.testing.assert_close(w_TK[valid], expect_w[valid])
    counts = w.tier_counts()
    assert counts[(0, "fast")] == int(valid.sum()) and counts[(0, "learned")] == 0
    # the padding rows went to the learned router, so they match the original decision
    ref = learned_layer0(tiny_model("mixtral", seed=0), ids, mask)
    assert torch.equal(idx_TK[~valid], ref.topk_idx_TK[~valid])


def test_shadow_verification_counts_and_demotes_like_brute_force():
    model = tiny_model("mixtral", seed=4)
    ids, mask = batch(seed=3, b=3, s=16)
    learned = learned_layer0(tiny_model("mixtral", seed=4), ids, mask)
    sets = [[0, 1], [2, 3], [0, 2]]
    tables = table_with(model, [0], sets, agree=88.0, total=100.0)
    cfg = VARConfig(shadow_rate=1.0, target_agreement=0.8)
    w = VARModelWrapper(model, cfg, tables=tables, patch_layers=[0])
    with torch.no_grad():
        w(input_ids=ids, attention_mask=mask)
    valid = mask.reshape(-1).bool()
    flat = ids.reshape(-1)
    agree_T = torch.tensor([set(sets[t % 3]) == set(l) for t, l in zip(flat.tolist(), learned.topk_idx_TK.tolist())])
    counts = w.verification_counts()
    assert counts[(0, "agree")] == int(agree_T[valid].sum())
    assert counts[(0, "disagree")] == int((~agree_T[valid]).sum())
    expect_demoted = set()
    for tok in set(flat[valid].tolist()):
        sel = (flat == tok) & valid
        sa, sn = int(agree_T[sel].sum()), int(sel.sum())
        combined = sps.binomtest(88 + sa, 100 + sn).proportion_ci(0.95, method="wilson").low < 0.8
        served = sn >= cfg.shadow_min_checks and sps.binomtest(sa, sn).proportion_ci(0.95, method="wilson").high < 0.8
        if combined or served:
            expect_demoted.add(tok)
    got = set(torch.nonzero(~served_members(w, 0)).squeeze(1).tolist())
    assert got == expect_demoted and expect_demoted
    assert w.get_performance_stats()["overall"]["demoted"] == len(expect_demoted)


def test_adaptive_k_uses_one_expert_and_the_empty_slot():
    model = tiny_model("mixtral", seed=0)
    tables = table_with(model, [0], [[2, 0], [1, 3]], [[0.95, 0.05], [0.6, 0.4]])
    w = VARModelWrapper(model, VARConfig(adaptive_k=True, adaptive_k_min_weight=0.9),
                        tables=tables, patch_layers=[0])
    seen, h = experts_inputs(model, 0)
    ids, mask = batch(seed=2, b=1)
    with torch.no_grad():
        w(input_ids=ids, attention_mask=mask)
    h.remove()
    idx, wt = seen[0]
    single = ids.reshape(-1) % 2 == 0
    assert torch.equal(idx[single], torch.tensor([[2, E]]).expand(int(single.sum()), 2))
    torch.testing.assert_close(wt[single], torch.tensor([[1.0, 0.0]]).expand(int(single.sum()), 2))
    assert torch.equal(idx[~single], torch.tensor([[1, 3]]).expand(int((~single).sum()), 2))
    assert w.get_performance_stats()["overall"]["adaptive_single"] == int(single.sum())


def test_learned_weights_restricted_to_the_table_set():
    model = tiny_model("mixtral", seed=0)
    ids, mask = batch(seed=5, b=1)
    probs = learned_layer0(tiny_model("mixtral", seed=0), ids, mask).probs_TE
    tables = table_with(model, [0], [[1, 2]])
    w = VARModelWrapper(model, VARConfig(weights_source="learned"), tables=tables, patch_layers=[0])
    seen, h = experts_inputs(model, 0)
    with torch.no_grad():
        w(input_ids=ids, attention_mask=mask)
    h.remove()
    p = probs[:, [1, 2]]
    torch.testing.assert_close(seen[0][1], p / p.sum(1, keepdim=True))


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_fast_tier_other_families_keep_weight_scale(family):
    model = tiny_model(family, seed=0)
    adapter = get_adapter(model)
    layer = adapter.moe_layers(model)[0].layer
    ids, mask = batch(seed=6, b=1)
    tables = table_with(model, [layer], [[0, 1]], [[0.5, 0.5]])
    w = VARModelWrapper(model, VARConfig(), tables=tables, patch_layers=[layer])
    seen, h = experts_inputs(model, layer)
    with torch.no_grad():
        w(input_ids=ids, attention_mask=mask)
    h.remove()
    scale = w.routers[layer].weight_scale
    got = seen[0][1].float().sum(1)
    if family == "deepseek_v3":  # normalised top-k weights times routed_scaling_factor
        assert scale == pytest.approx(model.config.routed_scaling_factor)
        torch.testing.assert_close(got, torch.full((ids.numel(),), scale))
    else:  # qwen2_moe does not renormalise top-k weights: the table's raw mass is used
        assert scale is None
        torch.testing.assert_close(got, tables[layer].mass_V[ids.reshape(-1)])


def test_row_tier_counts_fast_only_equal_a_brute_force_count():
    """Per batch row, fast = table members among its valid tokens summed over layers and forwards
    (padding skipped), learned = the rest of valid tokens x layers."""
    model = tiny_model("mixtral", seed=0)
    tables = table_with(model, [0, 1], [[0, 1]])
    tables[0].member_V[::2] = False
    tables[1].member_V[1::3] = False
    w = VARModelWrapper(model, VARConfig(), tables=tables)
    ids, mask = batch(seed=7, b=2)
    with torch.no_grad():
        w(input_ids=ids, attention_mask=mask)
        w(input_ids=ids[:, :3], attention_mask=mask[:, :3])
    expect = []
    for r in range(2):
        fast = valid = 0
        for cols in (range(ids.shape[1]), range(3)):
            for j in cols:
                if mask[r, j]:
                    valid += 1
                    fast += sum(bool(tables[l].member_V[int(ids[r, j])]) for l in (0, 1))
        expect.append([fast, valid * 2 - fast])
    assert w.row_tier_counts().tolist() == expect
    tc = w.tier_counts()
    assert [sum(tc[(l, t)] for l in (0, 1)) for t in ("fast", "learned")] == w.row_tier_counts().sum(0).tolist()
    w.reset_row_counts()
    assert w.row_tier_counts().numel() == 0


@pytest.mark.parametrize("track", [True, False])
def test_row_tier_counts_of_one_row_decoding_equal_a_brute_force_count(track):
    """Batch 1 (counted from the stack's own counters when they run, explicitly when they do not):
    a prefill, decode steps, `reset_stats()` in the middle (the row keeps what it counted), then a
    new record after `reset_row_counts()`; each equals the plain count."""
    model = tiny_model("mixtral", seed=0)
    tables = table_with(model, [0, 1], [[0, 1]])
    tables[0].member_V[::2] = False
    tables[1].member_V[1::3] = False
    w = VARModelWrapper(model, VARConfig(track_performance=track), tables=tables)
    ids, mask = batch(seed=5, b=1)
    steps = torch.randint(0, model.config.vocab_size, (4,), generator=torch.Generator().manual_seed(1))

    def expect(tokens):
        fast = sum(bool(tables[l].member_V[t]) for t in tokens for l in (0, 1))
        return [[fast, len(tokens) * 2 - fast]]

    seen = [int(t) for t, m in zip(ids[0], mask[0]) if m]
    with torch.no_grad():
        out = w(input_ids=ids, attention_mask=mask, use_cache=True)
        past, full = out.past_key_values, mask
        for i, t in enumerate(steps.tolist()):
            full = torch.cat([full, torch.ones(1, 1, dtype=full.dtype)], 1)
            out = w(input_ids=torch.tensor([[t]]), attention_mask=full, past_key_values=past, use_cache=True)
            past = out.past_key_values
            seen.append(t)
            if i == 1:
                w.reset_stats()
        assert w.row_tier_counts().tolist() == expect(seen)
        w.reset_row_counts()
        w(input_ids=ids, attention_mask=mask)
    assert w.row_tier_counts().tolist() == expect([int(t) for t, m in zip(ids[0], mask[0]) if m])


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_adaptive_k_outputs_match_eager_experts(impl):
    """The empty slot must also be safe in the fused expert kernels (they leave sentinel rows
    uninitialised unless told to mask them): logits equal the eager implementation's."""
    ids, mask = batch(seed=4, b=2)
    out = {}
    for name in ("eager", impl):
        model = tiny_model("mixtral", seed=0, experts_implementation=name)
        tables = table_with(model, [0, 1], [[2, 0], [1, 3]], [[0.95, 0.05], [0.6, 0.4]])
        w = VARModelWrapper(model, VARConfig(adaptive_k=True), tables=tables)
        with torch.no_grad():
            out[name] = w(input_ids=ids, attention_mask=mask).logits
        assert w.get_performance_stats()["overall"]["adaptive_single"] > 0
        # uninitialised memory is often finite, so also check the masking switch itself
        assert all(layer.mlp.experts._is_expert_parallel for layer in model.model.layers)
        w.restore()
        assert all(not layer.mlp.experts._is_expert_parallel for layer in model.model.layers)
    assert torch.isfinite(out[impl]).all()
    torch.testing.assert_close(out[impl], out["eager"], rtol=1e-4, atol=1e-5)


def test_demote_mask_equals_scipy_wilson_on_a_grid():
    from var_moe.var.certify import demote_mask, wilson_lower_bound

    rows = [(ca, ct, sa, st) for ct in (0, 50, 2000) for ca in {0, ct // 2, ct} for st in (0, 5, 20, 60)
            for sa in {0, st // 2, (9 * st) // 10, st}]
    t = torch.tensor(rows, dtype=torch.float64)
    for min_checks in (0, 20):
        z = 1.959963984540054
        running = wilson_lower_bound(t[:, 0] + t[:, 2], t[:, 1] + t[:, 3], z)
        got = demote_mask(running, t[:, 2], t[:, 3], 0.8, z, min_checks).tolist()
        for (ca, ct, sa, st), g in zip(rows, got):
            want = ct + st > 0 and sps.binomtest(ca + sa, ct + st).proportion_ci(0.95, method="wilson").low < 0.8
            want = want or (ct + st == 0)  # no evidence at all: the lower bound is 0
            if min_checks and st >= min_checks:
                want = want or sps.binomtest(sa, st).proportion_ci(0.95, method="wilson").high < 0.8
            assert g == want, (ca, ct, sa, st, min_checks)


def test_served_disagreement_demotes_despite_large_calibration_counts():
    """One token everywhere, a table set the learned router never picks, calibration 1000/1000:
    the running bound alone would keep the entry; shadow checks alone demote it."""
    model = tiny_model("mixtral", seed=4)
    ids = torch.full((2, 16), 7, dtype=torch.long)
    mask = torch.ones_like(ids)
    learned = learned_layer0(tiny_model("mixtral", seed=4), ids, mask)
    chosen = {tuple(sorted(x)) for x in learned.topk_idx_TK.tolist()}
    never = next((a, b) for a in range(E) for b in range(a + 1, E) if (a, b) not in chosen)
    for min_checks, demoted in ((0, False), (20, True)):
        w = VARModelWrapper(model, VARConfig(shadow_rate=1.0, target_agreement=0.8,
                                             shadow_min_checks=min_checks),
                            tables=table_with(model, [0], [list(never)]), patch_layers=[0])
        with torch.no_grad():
            w(input_ids=ids, attention_mask=mask)
        assert w.verification_counts()[(0, "disagree")] == 32
        assert bool(served_members(w, 0)[7]) is not demoted
        w.restore()


def test_a_router_returning_indices_first_is_refused_with_a_message():
    """GraniteMoE's router in transformers < 5.20 returns (indices, weights, logits): capture reads
    it, but VAR's router keeps the v5 order, so wrapping such a model is refused, not served wrong."""
    model = tiny_model("granitemoe", seed=0)
    adapter = get_adapter(model)
    block = adapter.moe_layers(model)[0].block
    router = getattr(block, adapter.router_attr)
    plain = router.forward
    router.forward = lambda x: tuple(reversed(plain(x)))  # the older order
    d = adapter.decision(router(torch.randn(5, model.config.hidden_size)))  # capture reads it
    assert d.topk_idx_TK.dtype == torch.long and d.probs_TE.shape == (5, adapter.num_experts)
    with pytest.raises(RuntimeError, match="returns \\(indices, weights, logits\\)"):
        VARModelWrapper(model, VARConfig())
