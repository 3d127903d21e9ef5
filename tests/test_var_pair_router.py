"""The router's (previous, token) tier on a tiny model: its decisions equal a plain-Python lookup
(previous valid token of the row, carried into the next decode step; padding never hits; a token
entry wins over a pair entry), pair tables round-trip through the tables file, and without pair
entries that fire the outputs are bit-identical to the token tables alone.
Run: `pytest tests/test_var_pair_router.py`."""

import pytest
import torch

from var_moe.adapters import get_adapter
from var_moe.tiny import tiny_model
from var_moe.var.config import VARConfig
from var_moe.var.evaluate import EvalBatch
from var_moe.var.evidence import collect_evidence, set_codes
from var_moe.var.pairs import PairTable, pair_candidates
from var_moe.var.certify import layer_candidates
from var_moe.var.tables import VARTables, certify_entries
from var_moe.var.wrapper import VARModelWrapper

torch.set_num_threads(1)
E, K = 4, 2
TOKEN_SET, PAIR_SETS = (0, 1), [(2, 3), (3, 1), (1, 2)]


def token_tables(model, layers):
    """Tokens with id % 3 == 0 are members routed to TOKEN_SET; the others have no entry."""
    tables = VARTables.empty(model, get_adapter(model), layers)
    v = model.config.vocab_size
    for l in layers:
        t = tables[l]
        t.experts_VK[:] = torch.tensor(TOKEN_SET)
        t.weights_VK[:] = torch.tensor([0.6, 0.4])
        t.member_V[:] = torch.arange(v) % 3 == 0
        t.bound_V[:], t.agree_V[:], t.total_V[:] = 0.99, 1000.0, 1000.0
    return tables


def pair_table(pairs: dict[tuple[int, int], tuple[int, int]], v: int) -> PairTable:
    keys = sorted(pairs)
    sets = torch.tensor([pairs[k] for k in keys], dtype=torch.long).reshape(-1, K)
    n = len(keys)
    return PairTable(torch.tensor([p * v + t for p, t in keys], dtype=torch.long), sets,
                     torch.tensor([[0.7, 0.3]] * n), torch.ones(n), set_codes(sets.sort(1).values, E),
                     torch.full((n,), 0.95), torch.full((n,), 100.0, dtype=torch.float64),
                     torch.full((n,), 100.0, dtype=torch.float64))


def inputs(seed=0, b=3, s=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    nxt = torch.randint(3, 40, (b, 1), generator=g)
    return ids, mask, nxt


def router_outputs(wrapper, layers):
    seen, hooks = {}, []
    for l in layers:
        hooks.append(wrapper.routers[l].register_forward_hook(lambda m, a, out, l=l: seen.__setitem__(l, out)))
    return seen, hooks


def expected(ids, mask, history, token_member, pairs_by_layer, layer):
    """Plain-Python reference: per row (in router order) the tier and set; history = last valid
    token of each batch row before this forward (-1 = none); returns (rows, new history)."""
    rows, hist = [], list(history)
    for b in range(ids.shape[0]):
        prev = hist[b]
        for s in range(ids.shape[1]):
            tok, ok = int(ids[b, s]), bool(mask[b, s])
            if not ok:
                rows.append(("learned", None))
                continue
            if token_member(tok):
                rows.append(("token", TOKEN_SET))
            elif (prev, tok) in pairs_by_layer[layer]:
                rows.append(("pair", pairs_by_layer[layer][(prev, tok)]))
            else:
                rows.append(("learned", None))
            prev = tok
        hist[b] = prev
    return rows, hist


def test_router_pair_decisions_equal_the_offline_lookup():
    model = tiny_model("mixtral", seed=3)
    layers = [0, 1]
    v = model.config.vocab_size
    ids, mask, nxt = inputs()
    # pair entries from pairs that occur (previous valid token, token), some for member tokens
    # (never served: the token entry wins), plus one spanning the prefill / decode boundary
    occurring = [(int(ids[b, s - 1]), int(ids[b, s])) for b in range(3) for s in range(4, 10)]
    occurring.append((int(ids[2, -1]), int(nxt[2, 0])))
    pairs = {l: {p: PAIR_SETS[(i + l) % 3] for i, p in enumerate(occurring) if i % 2 == l % 2 or i == len(occurring) - 1}
             for l in layers}
    pairs[0][(0, int(ids[1, 3]))] = (2, 3)  # padding id as "previous": must never hit (padding is not a token)
    tables = token_tables(model, layers)
    tables.pair_tier = {l: pair_table(pairs[l], v) for l in layers}
    w = VARModelWrapper(model, VARConfig(), tables=tables)
    assert w.tracker.window == 1 and w.stack.has_pairs
    seen, hooks = router_outputs(w, layers)
    history = [-1] * 3
    n_pair = 0
    with torch.no_grad():
        out = w(input_ids=ids, attention_mask=mask, use_cache=True)
        steps = [(ids, mask, seen.copy(), w.stack._last)]
        full = torch.cat([mask, torch.ones_like(nxt)], 1)
        w(input_ids=nxt, attention_mask=full, past_key_values=out.past_key_values, use_cache=True)
        steps.append((nxt, torch.ones_like(nxt), seen.copy(), w.stack._last))
    for h in hooks:
        h.remove()
    for step_ids, step_mask, outs, look in steps:
        new_hist = history
        for slot, l in enumerate(layers):
            rows, new_hist = expected(step_ids, step_mask, history, lambda t: t % 3 == 0, pairs, l)
            _, w_TK, idx_TK = outs[l]
            want_pair = torch.tensor([tier == "pair" for tier, _ in rows])
            assert torch.equal(look.pair_LT[slot].cpu(), want_pair)
            for r, (tier, st) in enumerate(rows):
                if tier != "learned":
                    assert tuple(idx_TK[r].tolist()) == st, (l, r, tier)
                if tier == "pair":
                    assert w_TK[r].tolist() == pytest.approx([0.7, 0.3])
            n_pair += int(want_pair.sum())
        history = new_hist
    assert any(bool(s[3].pair_LT.any()) for s in steps[1:])  # the decode step's first token used the carried token
    counts = w.stack.counts()
    from var_moe.var.stack import C

    assert int(counts[:, C["fast_pair"]].sum()) == n_pair > 0
    assert w.get_performance_stats()["overall"]["fast_pair"] == n_pair
    w.restore()


def test_without_pair_entries_that_fire_outputs_are_bit_identical():
    model = tiny_model("mixtral", seed=3)
    layers = [0, 1]
    v = model.config.vocab_size
    ids, mask, nxt = inputs(seed=1)
    outs = {}
    for name in ("none", "empty", "shadowed"):
        tables = token_tables(model, layers)
        if name == "empty":
            tables.pair_tier = {l: pair_table({}, v) for l in layers}
        if name == "shadowed":  # entries only for member tokens: the token entry always wins
            tables.pair_tier = {l: pair_table({(int(a), int(b)): (2, 3) for a, b in zip(ids[0, :-1], ids[0, 1:])
                                               if int(b) % 3 == 0}, v) for l in layers}
        w = VARModelWrapper(model, VARConfig(), tables=tables)
        with torch.no_grad():
            o1 = w(input_ids=ids, attention_mask=mask, use_cache=True)
            o2 = w(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                   past_key_values=o1.past_key_values, use_cache=True)
        outs[name] = (o1.logits, o2.logits, w.stack.counts())
        if name != "shadowed":
            assert not w.stack.has_pairs and w.tracker.window == 0 and w.stack._last.pair_LT is None
        w.restore()
    for name in ("empty", "shadowed"):
        for a, b in zip(outs["none"], outs[name]):
            assert torch.equal(a, b), name


def test_pair_tier_built_certified_and_round_tripped(tmp_path):
    model = tiny_model("mixtral", seed=3)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    batches = [EvalBatch(torch.randint(3, 9, (4, 24), generator=g), torch.ones(4, 24, dtype=torch.long),
                         [i * 4 + r for r in range(4)]) for i in range(10)]
    ev = collect_evidence(model, batches, adapter)
    cfg = VARConfig(frequency_threshold=4, target_agreement=0.6, pair_entries=True, min_pair_count=3)
    tables = VARTables.from_evidence(ev, model, adapter, cfg)
    cands = {l: layer_candidates(ev.layers[l], cfg) for l in ev.layers}
    pc = {l: pair_candidates(ev.layers[l], cfg, 3, True) for l in ev.layers}
    tabs, ptabs, info = certify_entries(cands, pc, cfg)
    assert sum(p.size for p in ptabs.values()) > 0
    assert tables.metadata["verification"]["pair_accepted"] == info["pair_accepted"]
    for l in ev.layers:
        assert torch.equal(tables[l].member_V, tabs[l].member_V)
        assert torch.equal(tables.pair_tier[l].keys_P, ptabs[l].keys_P)
    tables.save(tmp_path / "t.safetensors")
    back = VARTables.load(tmp_path / "t.safetensors", model)
    assert back.pair_sizes() == tables.pair_sizes() and back.metadata["pair_sizes"]
    for l, p in tables.pair_tier.items():
        for name in ("keys_P", "sets_PK", "weights_PK", "mass_P", "code_P", "bound_P", "agree_P", "total_P"):
            assert torch.equal(getattr(back.pair_tier[l], name), getattr(p, name))
    off = VARTables.from_evidence(ev, model, adapter, cfg.replace(pair_entries=False))
    assert off.pair_tier == {} and "pair_accepted" not in off.metadata["verification"]
    with pytest.raises(ValueError, match="pair_entries"):
        VARConfig(pair_entries=True, entropy_threshold=0.5)


def test_cpu_forward_without_a_pair_ending_token_skips_the_pair_lookup_and_routes_the_same():
    """On CPU a forward in which no token ends a pair entry skips the pair lookup (`_may_pair`): no
    pair rows and the same logits as the full lookup; a forward with such a token does not skip."""
    model = tiny_model("mixtral", seed=3)
    layers = [0, 1]
    v = model.config.vocab_size
    ids, mask, nxt = inputs(seed=2)
    ends = sorted({int(t) for t in ids[0, 1:]} - {int(t) for t in nxt[:, 0]} - {int(t) for t in range(0, v, 3)})
    assert ends  # a non-member token of the prefill that the decode step does not contain
    pairs = {(int(ids[0, s - 1]), int(ids[0, s])): (2, 3) for s in range(1, ids.shape[1]) if int(ids[0, s]) in ends}
    logits, looks = {}, {}
    for name in ("skip", "full"):
        tables = token_tables(model, layers)
        tables.pair_tier = {l: pair_table(pairs, v) for l in layers}
        w = VARModelWrapper(model, VARConfig(), tables=tables)
        if name == "full":
            w.stack._may_pair = lambda safe_T: True
        with torch.no_grad():
            o1 = w(input_ids=ids, attention_mask=mask, use_cache=True)
            prefill = w.stack._last
            o2 = w(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                   past_key_values=o1.past_key_values, use_cache=True)
        logits[name], looks[name] = (o1.logits, o2.logits), (prefill, w.stack._last, w.stack.counts())
        w.restore()
    prefill, decode, counts = looks["skip"]
    assert prefill.pair_LT is not None and bool(prefill.pair_LT.any())  # the prefill has pair rows
    assert decode.pair_LT is None  # skipped: no decode token ends a pair entry
    assert looks["full"][1].pair_LT is not None and not bool(looks["full"][1].pair_LT.any())
    assert all(torch.equal(a, b) for a, b in zip(logits["skip"], logits["full"]))
    assert torch.equal(counts, looks["full"][2])


def test_pair_skip_flags_only_pair_entries_that_can_serve_and_a_demotion_opens_them():
    """A pair entry whose token has a token entry in its layer never serves, so its token does not
    make a CPU forward run the pair lookup; once that token entry is demoted, it does."""
    model = tiny_model("mixtral", seed=3)
    layers = [0, 1]
    v = model.config.vocab_size
    member, other = 6, 7  # 6 % 3 == 0: a token entry in every layer; 7 has none
    tables = token_tables(model, layers)
    tables.pair_tier = {l: pair_table({(5, member): (2, 3), (5, other): (3, 1)}, v) for l in layers}
    w = VARModelWrapper(model, VARConfig(shadow_rate=0.5), tables=tables)
    stack = w.stack
    assert stack._may_pair(torch.tensor([other])) and not stack._may_pair(torch.tensor([member]))
    stack.pending_LV[stack.slot[1], member] = True  # a demotion queued in layer 1 only
    stack.apply_demotions()
    assert not bool(stack.member_LV[stack.slot[1], member]) and bool(stack.member_LV[stack.slot[0], member])
    assert stack._may_pair(torch.tensor([member]))
    w.restore()
