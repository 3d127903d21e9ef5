"""The per-step VAR decision of the vLLM integration (var_moe/vllm/routing.py, rows.py, tables.py),
without vLLM: baseline rows or non-member tokens give the learned decision back bit for bit, VAR
rows of member tokens get the table's experts and weights, the device counters (fast, learned,
audit agree/disagree; VAR rows only) match a brute-force count, and per-request modes become
per-token rows in the runner's order. The (previous, token) tier: each row's token and previous
token from the runner's token table equal a plain-Python walk over a mixed batch (prefill chunks,
decodes), the host lookup equals `var.served.find_pairs`, pair entries serve exactly the rows a
plain-Python lookup says (and none whose token on the device is not the host's), tables over the
pair capacity are refused before anything is written, the server's per-request count equals
the routers', and the staged writes GPU builds use leave the buffers the direct host writes leave, and a step's
expert-load counters (per layer, per tier, entropy, tokens; padding rows left out) equal a brute-force count.
Runs in both environments. Test: `pytest tests/test_vllm_routing.py`.
"""

from __future__ import annotations

import torch

from types import SimpleNamespace

import numpy as np

import pytest

from var_moe.errors import InvalidInputError
from var_moe.vllm.routing import FAST_OTHER, FAST_SAME, LEARNED, LayerVar, VarState, _same_set, tier_of
from var_moe.vllm.rows import MODE_KEY, RowWriter, pair_entries, request_modes, step_tokens, token_rows


def make_layer(vocab: int = 50, k: int = 2, e: int = 8, seed: int = 0) -> tuple[LayerVar, VarState]:
    """One MoE layer (slot 0) and its state, with a random token table."""
    g = torch.Generator().manual_seed(seed)
    state = VarState(torch.device("cpu"), max_tokens=100, top_k=k, num_layers=1, vocab_size=vocab)
    state.experts_SVK[0] = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(vocab)])
    weights = torch.rand(vocab, k, generator=g)
    state.weights_SVK[0] = weights / weights.sum(1, keepdim=True)
    state.member_SV[0] = torch.rand(vocab, generator=g) < 0.4
    return LayerVar(0, torch.nn.Linear(4, e), True, e, 1.0), state


def learned(t: int, k: int = 2, e: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(t, e, generator=g), -1)
    w, idx = probs.topk(k, dim=1)
    return (w / w.sum(1, keepdim=True)).float(), idx.int()


@pytest.mark.parametrize("e,k", [(8, 2), (128, 8)])
def test_same_set_matches_sorted_comparison(e, k):
    g = torch.Generator().manual_seed(3)
    a = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(200)])
    b = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(200)])
    b[::3] = a[::3].flip(1)  # same sets in another order
    for r in range(1, 200, 3):  # all but one id shared (ids within a row stay distinct)
        b[r] = a[r]
        b[r, 0] = next(x for x in range(e) if x not in a[r].tolist())
    expect = (a.sort(1).values == b.sort(1).values).all(1)
    assert torch.equal(_same_set(a, b), expect) and torch.equal(_same_set(b, a), expect)
    assert bool(expect.any()) and not bool(expect.all())


def test_row_codes_map_to_tiers_in_torch_and_numpy():
    from var_moe.var.served import TIERS

    codes = [-1, FAST_SAME, LEARNED, FAST_OTHER]
    want = [-1, TIERS.index("fast"), TIERS.index("learned"), TIERS.index("fast")]
    assert tier_of(torch.tensor(codes)).tolist() == want
    assert tier_of(np.array(codes, dtype=np.int64)).tolist() == want


def test_baseline_rows_give_learned_back_and_var_rows_take_table_rows():
    lv, state = make_layer()
    ids = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(2))
    w, idx = learned(64)
    out_w, out_idx = lv.route(state, ids, w, idx)
    assert torch.equal(out_w, w) and torch.equal(out_idx, idx)  # every row baseline: bit for bit
    assert state.counts_SC.tolist() == [[0, 0, 0, 0]]  # baseline rows are not VAR traffic
    rows = torch.arange(64) % 3 != 0  # a mixed batch: every third row baseline
    state.rows_N[:64] = rows
    out_w, out_idx = lv.route(state, ids, w, idx)
    use = state.member_SV[0][ids] & rows
    assert torch.equal(out_idx[use], state.experts_SVK[0][ids][use].int())
    assert torch.equal(out_w[use], state.weights_SVK[0][ids][use])
    assert torch.equal(out_idx[~use], idx[~use]) and torch.equal(out_w[~use], w[~use])
    same = (state.experts_SVK[0][ids].sort(1).values == idx.long().sort(1).values).all(1)
    fast, learned_n, agree, disagree = state.counts_SC[0].tolist()
    assert fast == int(use.sum()) and learned_n == int(rows.sum()) - fast
    assert agree == int((use & same).sum()) and disagree == fast - agree


def test_request_modes_become_token_rows_in_runner_order():
    params = lambda v: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=v))  # noqa: E731
    requests = {"a": params({MODE_KEY: True}), "b": params({MODE_KEY: False}), "c": params(None),
                "d": SimpleNamespace(sampling_params=None)}  # d: a pooling request
    order = ["c", "a", "d", "b"]
    for default in (False, True):
        modes = request_modes(order, requests, default)
        assert modes.tolist() == [default, True, default, False]
        tokens = np.array([3, 1, 2, 4])
        rows = token_rows(modes, tokens)
        brute = [m for m, n in zip(modes.tolist(), tokens.tolist()) for _ in range(n)]
        assert rows.tolist() == brute
    state = VarState(torch.device("cpu"), max_tokens=16)
    state.rows_N.fill_(True)  # stale rows of a larger previous step
    RowWriter(state).write(np.array([True, False, True]))
    assert state.rows_N.tolist() == [True, False, True] + [False] * 13  # the tail (padding) is baseline


def test_step_tokens_equal_a_walk_over_each_request():
    """A hand-made step as vLLM's runner lays it out: a fresh prefill, a later prefill chunk, two
    decodes, a request with nothing scheduled; positions = computed tokens + position in the step."""
    g = np.random.default_rng(0)
    token_ids = g.integers(0, 100, size=(6, 40)).astype(np.int32)  # requests x max_model_len
    computed = np.array([0, 16, 9, 30, 5, 1], dtype=np.int32)  # num_computed_tokens_cpu
    scheduled = np.array([7, 8, 1, 1, 0, 3])  # fresh prefill, chunk 2, decode, decode, idle, short chunk
    brute_prev, brute_tok = [], []
    for r, n in enumerate(scheduled.tolist()):
        for j in range(n):
            pos = int(computed[r]) + j
            brute_prev.append(int(token_ids[r, pos - 1]) if pos > 0 else -1)
            brute_tok.append(int(token_ids[r, pos]))
    prev, tok = step_tokens(token_ids, computed, scheduled)
    assert prev.dtype == tok.dtype == np.int64 and prev.tolist() == brute_prev and tok.tolist() == brute_tok
    assert prev[0] == -1 and (prev == -1).sum() == 1  # only the fresh prefill's first row has none
    assert [x.tolist() for x in step_tokens(token_ids, computed[:0], scheduled[:0])] == [[], []]
    # a decode step (one row per request, its own path), a request at position 0 among them
    prev, tok = step_tokens(token_ids, computed, np.ones(6, dtype=np.int64))
    assert prev.tolist() == [-1] + [int(token_ids[r, computed[r] - 1]) for r in range(1, 6)]
    assert tok.tolist() == [int(token_ids[r, computed[r]]) for r in range(6)] and prev.dtype == tok.dtype == np.int64


def test_row_writer_writes_pair_entries_and_resets_what_earlier_steps_filled():
    state = VarState(torch.device("cpu"), max_tokens=8, pair_capacity=4, top_k=2, num_layers=2)
    none = 4  # the empty slot
    assert state.pair_sel_NS.shape == (8, 2) and bool((state.pair_sel_NS == none).all())
    writer = RowWriter(state)
    writer.write(np.ones(5, dtype=bool), np.array([[0, 4], [4, 1], [4, 4], [2, 3], [4, 4]]))
    assert state.pair_sel_NS[:5].tolist() == [[0, 4], [4, 1], [4, 4], [2, 3], [4, 4]]
    assert bool((state.pair_sel_NS[5:] == none).all())
    writer.write(np.ones(2, dtype=bool), np.array([[1, 1], [4, 0]]))  # a smaller step: the rest is reset
    assert state.pair_sel_NS.tolist() == [[1, 1], [4, 0]] + [[none, none]] * 6
    writer.write(np.ones(3, dtype=bool))  # a step no entry serves
    assert bool((state.pair_sel_NS == none).all())
    assert VarState(torch.device("cpu"), max_tokens=8).pair_sel_NS is None  # no pair tier: no buffer


def test_host_pair_lookup_equals_find_pairs():
    """`pair_entries` (numpy, once per step) against `var.served.find_pairs` (torch, the builtin
    router's), on random keys of three layer slots, with sequence starts, out-of-vocabulary tokens,
    baseline rows and token entries (which win); a decode step's dict lookup against both."""
    from var_moe.var.served import find_pairs
    from var_moe.vllm.rows import decode_entries, index_pairs

    g = np.random.default_rng(5)
    v, s, t = 30, 3, 400
    keys = np.unique(g.integers(0, s * v * v, size=300)).astype(np.int64)
    state = VarState(torch.device("cpu"), max_tokens=t, pair_capacity=len(keys) + 5, top_k=2, num_layers=s)
    member = g.random((v, s)) < 0.3
    index_pairs(state, keys, member)
    # most rows reuse a stored (previous, token) so that many hit
    pick = keys[g.integers(0, len(keys), size=t)] % (v * v)
    prev, tok = pick // v, pick % v
    prev[::7], tok[::11], prev[::13] = -1, v + 3, v  # starts, an out-of-vocabulary token and previous token
    rows = g.random(t) < 0.8
    got = pair_entries(state, rows, prev, tok)
    for slot in range(s):
        hit, idx = find_pairs(torch.from_numpy(keys), torch.from_numpy(prev), torch.from_numpy(tok).clamp(0, v - 1),
                              v, slot)
        served = hit.numpy() & rows & (tok < v) & ~member[np.minimum(tok, v - 1), slot]
        want = np.where(served, idx.numpy(), state.pair_capacity)
        assert got[:, slot].tolist() == want.tolist()
        assert served.sum() > 20
    assert pair_entries(state, np.zeros(t, dtype=bool), prev, tok) is None  # no VAR row: nothing to write
    # a decode step (request r's row at position 1: previous token, token) reads the same entries
    # from the host dict; baseline requests get none
    ids_RS = np.stack([prev, tok], 1)
    sel, prev_T = decode_entries(state, rows, ids_RS, np.ones(t, dtype=np.int64))
    assert sel.tolist() == got.tolist()
    assert prev_T.tolist() == prev.tolist()
    one, prev_1 = decode_entries(state, rows[:1], ids_RS[:1, 1:], np.zeros(1, dtype=np.int64))  # a sequence start
    assert one is None and prev_1.tolist() == [-1]
    assert decode_entries(state, np.zeros(t, dtype=bool), ids_RS, np.ones(t, dtype=np.int64))[0] is None


V, K, E = 60, 2, 8
# (prev, tok) -> set; (2, 2) is never served: token 2 has a token entry in layer 0, which wins
PAIRS = {0: {(5, 7): (2, 3), (6, 7): (0, 1), (9, 1): (1, 2), (11, 4): (6, 5), (2, 2): (4, 7)},
         1: {(5, 7): (4, 5), (3, 8): (7, 0)}}


def pair_tables(pairs=PAIRS, vocab=V):
    """Tiny-model-shaped tables: layer 0 token entries for even tokens (not 4, 7, 1, 8), the pairs."""
    from var_moe.capture.router_math import set_codes
    from var_moe.var.pairs import PairTable
    from var_moe.var.tables import LayerTable, VARTables

    layers = {}
    for l in (0, 1):
        t = LayerTable.empty(vocab, K)
        if l == 0:
            t.member_V[::2] = True
            t.member_V[[4, 8]] = False
        t.experts_VK[:] = torch.tensor([3, 6])
        t.weights_VK[:] = torch.tensor([0.75, 0.25])
        t.mass_V[:] = 0.8
        layers[l] = t
    meta = {"model_type": "mixtral", "vocab_size": vocab, "num_experts": E, "top_k": K,
            "router_fingerprint": "f", "layers": [0, 1]}
    tables = VARTables(layers, meta)
    for l, ps in pairs.items():
        keys = sorted(ps)
        sets = torch.tensor([ps[k] for k in keys], dtype=torch.long).reshape(-1, K)
        n = len(keys)
        w = torch.tensor([[0.6 + 0.1 * (i % 3), 0.4 - 0.1 * (i % 3)] for i in range(n)]).reshape(-1, K)
        tables.pair_tier[l] = PairTable(torch.tensor([p * vocab + t for p, t in keys], dtype=torch.long), sets, w,
                                        torch.full((n,), 0.9), set_codes(sets.sort(1).values, E), torch.full((n,), 0.95),
                                        torch.full((n,), 50.0, dtype=torch.float64),
                                        torch.full((n,), 50.0, dtype=torch.float64))
    return tables


def pair_state(capacity: int, renormalize=(True, False)) -> VarState:
    state = VarState(torch.device("cpu"), max_tokens=64, pair_capacity=capacity, top_k=K, num_layers=2, vocab_size=V)
    for l in (0, 1):
        state.layers[l] = LayerVar(l, torch.nn.Linear(4, E), renormalize[l], E, 1.0 if renormalize[l] else None, slot=l)
    state.identity = {"model_type": "mixtral", "vocab_size": V, "num_experts": E, "top_k": K,
                      "router_fingerprint": "f", "layers": [0, 1]}
    return state


def test_pair_entries_serve_exactly_the_rows_a_plain_lookup_says(tmp_path):
    from var_moe.vllm.tables import load_tables

    tables = pair_tables()
    path = tables.save(tmp_path / "pairs.safetensors")
    state = pair_state(capacity=16)
    reply = load_tables(state, path)
    assert reply["pair_entries"] == 7 and reply["pair_sizes"] == {0: 5, 1: 2} and reply["pair_capacity"] == 16
    # rows: (prev, tok); a pair of the other layer, a member token whose pair exists (token wins in
    # layer 0), a sequence start, a padding slot's -1, an out-of-vocabulary previous token
    prev = [5, 6, 9, 3, -1, 11, 5, 2, 70, 5, 6, 9]
    ids = [7, 7, 1, 8, 7, 4, 7, 2, 1, 7, 7, 1]
    t = len(ids)
    modes = [True] * 9 + [False, True, True]  # one baseline row
    RowWriter(state).write(np.array(modes), pair_entries(state, np.array(modes), np.array(prev), np.array(ids)))
    w, idx = learned(t)
    outs = {l: lv.route(state, torch.tensor(ids), w, idx) for l, lv in state.layers.items()}  # one forward
    for l, lv in state.layers.items():
        out_w, out_idx = outs[l]
        fast_n = agree_n = 0
        for r in range(t):
            key = (prev[r], ids[r])
            if modes[r] and bool(tables[l].member_V[ids[r]]):
                want_idx, want_w = tables[l].experts_VK[ids[r]].tolist(), tables[l].weights_VK[ids[r]]
                want_w = want_w if lv.renormalize else want_w * tables[l].mass_V[ids[r]]
            elif modes[r] and key in PAIRS[l]:
                p = tables.pair_tier[l]
                i = int((p.keys_P == prev[r] * V + ids[r]).nonzero())
                want_idx = list(PAIRS[l][key])
                want_w = p.weights_PK[i] if lv.renormalize else p.weights_PK[i] * p.mass_P[i]
            else:
                assert out_idx[r].tolist() == idx[r].tolist() and torch.equal(out_w[r], w[r]), (l, r)
                continue
            fast_n += 1
            agree_n += sorted(want_idx) == sorted(idx[r].tolist())
            assert out_idx[r].tolist() == want_idx, (l, r)
            torch.testing.assert_close(out_w[r], want_w.float())
        assert fast_n > 0
        assert state.counts_SC[lv.slot].tolist() == [fast_n, sum(modes) - fast_n, agree_n, fast_n - agree_n]
    # layer 1 has no token entries: its pair rows are (5, 7) twice in VAR mode (a third is baseline), (3, 8)
    assert state.counts_SC[1, 0] == 3
    # the device refuses an entry whose token is not the row's (a host that did not know the token)
    other = list(ids)
    other[0] = 9  # row 0 was (5, 7), a pair row in both layers
    for lv in state.layers.values():
        out_w, out_idx = lv.route(state, torch.tensor(other), w, idx)
        assert out_idx[0].tolist() == idx[0].tolist() and torch.equal(out_w[0], w[0])


def test_tables_over_the_pair_capacity_are_refused_before_anything_is_written(tmp_path):
    from var_moe.vllm.tables import clear_tables, load_tables

    path = pair_tables().save(tmp_path / "pairs.safetensors")
    state = pair_state(capacity=6)
    with pytest.raises(InvalidInputError, match=r"hold 7 \(previous, token\) entries.*room for 6"):
        load_tables(state, path)
    assert not bool(state.member_SV.any())  # nothing written
    assert state.pair_entries == 0 and bool((state.pair_tok_X == -1).all())
    with pytest.raises(InvalidInputError, match="room for 0"):  # an engine built without a pair tier
        load_tables(pair_state(capacity=0), path)
    no_pairs = pair_tables(pairs={}).save(tmp_path / "tokens.safetensors")
    assert load_tables(pair_state(capacity=0), no_pairs)["pair_entries"] == 0
    # a smaller file after a larger one: the slots left hold no token again; clearing empties all
    state = pair_state(capacity=8)
    load_tables(state, path)
    assert state.pair_entries == 7 and int((state.pair_tok_X != -1).sum()) == 7
    load_tables(state, pair_tables(pairs={1: {(3, 8): (7, 0)}}).save(tmp_path / "one.safetensors"))
    assert state.pair_entries == 1 and state.pair_tok_X.tolist() == [8] + [-1] * 8
    assert state.pair_bases_U.tolist() == [3 * V + 8] and state.pair_rows_US.tolist() == [[8, 0]]  # slot 1 only
    clear_tables(state)
    assert state.pair_entries == 0 and bool((state.pair_tok_X == -1).all())
    assert state.pair_rows_host == {} and state.pair_bases_U.size == 0


def test_server_request_counts_equal_the_routers_counts(tmp_path):
    """The server's per-request count (`served.tier_counts` on the tables `VllmHost.load` stacks
    with `ServedTables.from_tables`), from the forwarded tokens, counts the fast rows the routers
    count for the same request, pair rows included, also when the first forwarded token has a
    previous token (a prefix-cache hit)."""
    from var_moe.var.served import ServedTables, tier_counts
    from var_moe.vllm.tables import load_tables

    tables = pair_tables()
    state = pair_state(capacity=16)
    load_tables(state, tables.save(tmp_path / "pairs.safetensors"))
    seq = [3, 5, 7, 6, 7, 9, 1, 11, 4, 5, 7, 3, 8, 2]
    layers = [0, 1]
    served = ServedTables.from_tables(tables, layers)
    member_LV = served.member_LV
    for cached in (0, 4):
        token_ids = np.array([seq], dtype=np.int32)
        n = len(seq) - cached
        rows = np.ones(n, dtype=bool)
        prev, tok = step_tokens(token_ids, np.array([cached]), np.array([n]))
        RowWriter(state).write(rows, pair_entries(state, rows, prev, tok))
        w, idx = learned(n)
        state.counts_SC.zero_()
        for lv in state.layers.values():
            lv.route(state, torch.tensor(seq[cached:]), w, idx)
        fast = int(state.counts_SC[:, 0].sum())
        got = tier_counts(served, seq[cached:], seq[cached - 1] if cached else -1)
        assert got["fast"] == fast and got["fast"] + got["learned"] == n * len(layers)
        assert fast > int(member_LV[:, torch.tensor(seq[cached:])].sum())  # pair rows are among them


def test_server_pair_capacity_defaults_to_the_startup_tables_pair_entries(tmp_path):
    """`--vllm-pair-capacity` unset: room for exactly the startup file's pair entries (0 for a file
    without them: no pair tier is built, so no step pays for a lookup); set: the operator's number."""
    from server.vllm_host import pair_capacity
    from var_moe.var.tables import VARTables

    with_pairs = VARTables.load(pair_tables().save(tmp_path / "pairs.safetensors"))
    without = VARTables.load(pair_tables(pairs={}).save(tmp_path / "tokens.safetensors"))
    unset, set_to_9 = SimpleNamespace(vllm_pair_capacity=None), SimpleNamespace(vllm_pair_capacity=9)
    assert pair_capacity(unset, with_pairs) == sum(pair_tables().pair_sizes().values()) > 0
    assert pair_capacity(unset, without) == 0
    assert pair_capacity(set_to_9, without) == 9


def test_server_reads_each_layer_once_from_its_workers():
    """Tensor-parallel ranks report equal counters (counted once, not summed); workers holding other
    layers (pipeline stages) add theirs."""
    from var_moe.vllm.agreement import worker_counts

    def engine(replies):
        return SimpleNamespace(collective_rpc=lambda name: replies)

    tp = [{0: [4, 6, 3, 1], 1: [2, 8, 2, 0]}, {0: [4, 6, 3, 1], 1: [2, 8, 2, 0]}]
    assert worker_counts(engine(tp)) == {0: [4, 6, 3, 1], 1: [2, 8, 2, 0]}
    pp = [{0: [4, 6, 3, 1]}, {"1": [2, 8, 2, 0]}]
    assert worker_counts(engine(pp)) == {0: [4, 6, 3, 1], 1: [2, 8, 2, 0]}


def test_staged_row_writes_equal_direct_ones():
    """The path GPU builds take (host staging buffers, prefix copies to the device buffers) leaves
    the same buffers as the direct host writes, step after step: a large step, a smaller one, one
    with no pair row, one with no VAR row, a larger one again."""
    steps = [(np.array([True] * 6), np.arange(12).reshape(6, 2) % 5),
             (np.array([True, False, True]), np.array([[4, 1], [4, 4], [0, 4]])),
             (np.array([True, True]), None),
             (np.zeros(4, dtype=bool), None),
             (np.array([False, True] * 4), np.arange(16).reshape(8, 2) % 5)]
    direct_state, staged_state = (VarState(torch.device("cpu"), max_tokens=10, pair_capacity=4, top_k=2, num_layers=2)
                                  for _ in range(2))
    direct, staged = RowWriter(direct_state), RowWriter(staged_state, staged=True)
    assert staged.staging.data_ptr() != staged_state.rows_N.data_ptr()  # it really stages
    for rows, sel in steps:
        direct.write(rows, sel)
        staged.write(rows, sel)
        assert torch.equal(direct_state.rows_N, staged_state.rows_N)
        assert torch.equal(direct_state.pair_sel_NS, staged_state.pair_sel_NS)
        n = rows.shape[0]
        assert direct_state.rows_N[:n].tolist() == rows.tolist() and not bool(direct_state.rows_N[n:].any())
        want = np.full((10, 2), 4) if sel is None else np.vstack([sel, np.full((10 - n, 2), 4)])
        assert direct_state.pair_sel_NS.tolist() == want.tolist()


def test_tables_refused_where_vllm_scales_weights_otherwise_than_the_family():
    """A family whose router weights sum to 2.5 (DeepSeek-V3 style) on a vLLM router that renormalises
    to 1, or one whose weights sum to no constant on a renormalising router: refused, not served."""
    from var_moe.var.tables import LayerTable, VARTables
    from var_moe.vllm.tables import served_tables

    for renorm, scale in ((True, 2.5), (True, None), (False, 1.0)):
        state = pair_state(0, renormalize=(renorm, renorm))
        for lv in state.layers.values():
            lv.weight_scale = scale
        tables = VARTables({l: LayerTable.empty(V, K) for l in (0, 1)}, {"vocab_size": V, "top_k": K})
        with pytest.raises(InvalidInputError, match="vLLM routes this model differently"):
            served_tables(state, tables)
    state = pair_state(0)  # consistent: accepted
    served_tables(state, VARTables({l: LayerTable.empty(V, K) for l in (0, 1)}, {"vocab_size": V, "top_k": K}))
    # DeepSeek on vLLM: the family's weights sum to 2.5, vLLM's router renormalises to 1 and its runner
    # multiplies the output by 2.5, so the served weights sum to 1 (raw ones: mass / 2.5)
    state = pair_state(0, renormalize=(True, False))
    for lv, scale in zip(state.layers.values(), (2.5, None)):
        lv.weight_scale, lv.output_scale = scale, 2.5
    tabs = {l: LayerTable.empty(V, K) for l in (0, 1)}
    for t in tabs.values():
        t.weights_VK[:] = torch.tensor([0.75, 0.25])
        t.mass_V[:] = 3.0
    served = served_tables(state, VARTables(tabs, {"vocab_size": V, "top_k": K}))
    torch.testing.assert_close(served.w_LVK[0], torch.tensor([0.75, 0.25]).expand(V, K))
    torch.testing.assert_close(served.w_LVK[1], torch.tensor([0.75, 0.25]).expand(V, K) * 3.0 / 2.5)


def test_expert_load_counts_of_a_step_equal_a_brute_force_count():
    """Two MoE layers, a mixed batch (VAR and baseline rows) with padding rows: after the last layer
    the counters hold each valid row's experts per layer, per tier (VAR rows only), its routing
    entropy summed per layer, and nothing of the padding rows."""
    from var_moe.vllm.expert_load import install_load

    g = torch.Generator().manual_seed(5)
    vocab, k, e, t = 40, 2, 8, 30
    state = VarState(torch.device("cpu"), max_tokens=64, top_k=k, num_layers=2, vocab_size=vocab)
    layers = []
    for s in range(2):
        state.experts_SVK[s] = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(vocab)])
        state.weights_SVK[s] = torch.full((vocab, k), 1.0 / k)
        state.member_SV[s] = torch.rand(vocab, generator=g) < 0.5
        layers.append(LayerVar(s, torch.nn.Linear(4, e), True, e, 1.0, slot=s))
    load = install_load(state, e, k)
    valid = torch.arange(t) < 26  # the last rows are padding
    load.valid_N[:t] = valid
    rows = torch.rand(t, generator=g) < 0.6
    state.rows_N[:t] = rows
    ids = torch.randint(0, vocab, (t,), generator=g)
    want = np.zeros((2, e), np.int64)
    want_tier = np.zeros((2, 2, e), np.int64)  # fast, learned
    want_h = np.zeros(2)
    for s, lv in enumerate(layers):
        logits = torch.randn(t, e, generator=g)
        w, idx = torch.softmax(logits, -1).topk(k, -1)
        _, out_idx = lv.route(state, ids, w, idx.int(), logits)
        p = torch.softmax(logits.double(), -1)
        h = -(p * p.log()).sum(-1)
        served = state.member_SV[s][ids] & rows
        for r in range(t):
            if not valid[r]:
                continue
            want_h[s] += float(h[r])
            for x in out_idx[r].tolist():
                want[s, x] += 1
                if rows[r]:
                    want_tier[0 if served[r] else 1, s, x] += 1
    r = load.counter.read()
    np.testing.assert_array_equal(r.counts_LE, want)
    np.testing.assert_array_equal(r.tier_counts_XLE, want_tier)
    np.testing.assert_array_equal(r.tokens_L, [int(valid.sum())] * 2)
    np.testing.assert_allclose(r.entropy_L, want_h, rtol=1e-5)
