"""Every consumer of the served tables makes the decision `var.served.decide` makes.

On random tables (token entries, pair entries, some of whose tokens have a token entry too, a layer
with no entries, a layer without pair entries, or none at all) and random rows (sequence starts,
padding, out-of-vocabulary ids where the consumer can meet them), each consumer's rows served from
a table, and their sets and weights, equal `decide`'s: the builtin router's general path and its
one-row host path (also after a demotion opens pair entries), vLLM's host pair selection with its
device routing, and its one-row dict, the server's per-request count, the offline served masks and
the offload `var` predictor. Runs in both environments. Test: `pytest tests/test_served_decision.py`.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from var_moe.token_tracker import TokenBatch
from var_moe.var.config import VARConfig
from var_moe.capture.router_math import set_codes
from var_moe.var.pairs import PairTable
from var_moe.var.served import ServedTables, decide, tier_counts
from var_moe.var.tables import LayerTable, VARTables

V, K, E, LAYERS, T = 40, 2, 8, [0, 1, 2], 300
SCALES = {0: 1.0, 1: None, 2: 2.0}  # a renormalising router, one without a constant sum, a scaled one
KINDS = ("tokens_and_pairs", "tokens_only", "empty")


def random_tables(kind: str, seed: int = 0) -> VARTables:
    g = torch.Generator().manual_seed(seed)
    layers, tier = {}, {}
    for l in LAYERS:
        t = LayerTable.empty(V, K)
        t.experts_VK[:] = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)])
        w = torch.rand(V, K, generator=g) + 0.1
        t.weights_VK[:] = w / w.sum(1, keepdim=True)
        t.mass_V[:] = torch.rand(V, generator=g) * 0.5 + 0.5
        if kind != "empty" and l != 1:  # layer 1: no token entries
            t.member_V[:] = torch.rand(V, generator=g) < 0.35
        t.agree_V[:], t.total_V[:], t.bound_V[:] = 100.0, 100.0, 0.97
        layers[l] = t
        if kind == "tokens_and_pairs" and l != 2:  # layer 2: no pair entries
            keys = torch.randperm(V * V, generator=g)[:150].sort().values
            sets = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(150)])
            pw = torch.rand(150, K, generator=g) + 0.1
            tier[l] = PairTable(keys, sets, pw / pw.sum(1, keepdim=True), torch.rand(150, generator=g) + 0.2,
                                set_codes(sets.sort(1).values, E), torch.full((150,), 0.95),
                                torch.full((150,), 50.0, dtype=torch.float64), torch.full((150,), 50.0, dtype=torch.float64))
    meta = {"model_type": "mixtral", "vocab_size": V, "num_experts": E, "top_k": K, "router_fingerprint": "f",
            "layers": LAYERS}
    return VARTables(layers, meta, pair_tier=tier)


def random_rows(tables: VARTables, seed: int = 1, oov: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prev_T, ids_T, valid_T): most rows repeat a stored pair so that many hit."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.cat([p.keys_P for p in tables.pair_tier.values()] + [torch.randint(0, V * V, (50,), generator=g)])
    pick = keys[torch.randint(0, keys.numel(), (T,), generator=g)]
    prev, ids = pick // V, pick % V
    prev[::7] = -1  # sequence starts
    if oov:
        ids[::23] = V + 3
    valid = torch.rand(T, generator=g) > 0.1  # padding
    return prev, ids, valid


def served_rows(d, scales_served: ServedTables | None = None):
    """(fast_LT, idx_LTK, w_LTK) with the sets and weights of unserved rows zeroed (they are not a decision)."""
    f = d.fast_LT
    return f, torch.where(f[..., None], d.idx_LTK.long(), 0), torch.where(f[..., None], d.w_LTK.float(), 0.0)


def assert_same(got, want):
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])


def builtin_stack(tables: VARTables, shadow: float = 0.0):
    from var_moe.var.stack import TableStack

    return TableStack({l: tables.layers[l] for l in LAYERS}, LAYERS, VARConfig(shadow_rate=shadow), E, SCALES,
                      torch.device("cpu"), torch.long, pair_tier=tables.pair_tier)


def demote(stack) -> None:
    """A shadow demotion of every token entry of layer 0 (opens that layer's pair entries)."""
    stack.pending_LV[0] = True
    stack.apply_demotions()


# -- the consumers, each returning (fast_LT, idx_LTK, w_LTK) and the reference decision ----------
def builtin_general(tables, prev, ids, valid, demoted):
    stack = builtin_stack(tables, shadow=0.1 if demoted else 0.0)
    if demoted:
        demote(stack)
    tok = TokenBatch(ids, valid, prev[:, None], T, 1)
    look = stack.lookup(tok, torch.device("cpu"))
    f = look.fast_LT
    got = (f, torch.where(f[..., None], look.idx_LTK.long(), 0), torch.where(f[..., None], look.w_LTK.float(), 0.0))
    return got, served_rows(decide(stack.served, ids, valid, prev))


def builtin_one_row(tables, prev, ids, valid, demoted):
    stack = builtin_stack(tables, shadow=0.1 if demoted else 0.0)
    if demoted:
        demote(stack)
    n = len(LAYERS)
    f, idx, w = torch.zeros(n, T, dtype=torch.bool), torch.zeros(n, T, K, dtype=torch.long), torch.zeros(n, T, K)
    keep = ids < V  # the one-row path hands out-of-vocabulary ids to the general path
    for r in torch.nonzero(keep).squeeze(1).tolist():
        tok = TokenBatch.one_step(ids[r:r + 1].reshape(1, 1), int(ids[r]), bool(valid[r]), (int(prev[r]),))
        stack.begin_forward(tok)
        for slot, row in enumerate(stack.step_rows or [None] * n):
            if row is not None:
                f[slot, r], idx[slot, r], w[slot, r] = True, row[0][0].long(), row[1][0].float()
    want = served_rows(decide(stack.served, ids, valid, prev))
    return tuple(x[:, keep] for x in (f, idx, w)), tuple(x[:, keep] for x in want)


def vllm_state(tables):
    from var_moe.vllm.routing import LayerVar, VarState

    state = VarState(torch.device("cpu"), max_tokens=T, pair_capacity=400, top_k=K, num_layers=len(LAYERS), vocab_size=V)
    for slot, l in enumerate(LAYERS):
        state.layers[l] = LayerVar(l, torch.nn.Linear(4, E), SCALES[l] is not None, E, 1.0 if SCALES[l] is not None else None, slot=slot)
    state.identity = {"model_type": "mixtral", "vocab_size": V, "num_experts": E, "top_k": K,
                      "router_fingerprint": "f", "layers": LAYERS}
    from var_moe.vllm.tables import fill_tables

    fill_tables(state, tables)
    return state


def vllm_reference(tables, prev, ids, valid):
    scales = {l: 1.0 if SCALES[l] is not None else None for l in LAYERS}  # what a vLLM router sums to
    ref = ServedTables.build(tables.layers, tables.pair_tier, LAYERS, scales, V, K)
    return served_rows(decide(ref, ids, valid, prev))


def vllm_route(state, ids, sel_TS, rows):
    from var_moe.vllm.rows import RowWriter

    if not hasattr(state, "writer"):  # one per runner: it resets what earlier steps wrote
        state.writer = RowWriter(state)
    state.writer.write(rows.numpy(), sel_TS)
    g = torch.Generator().manual_seed(3)
    w_TK, idx_TK = torch.softmax(torch.randn(ids.shape[0], E, generator=g), -1).topk(K, dim=1)
    out = [state.layers[l].route(state, ids, w_TK, idx_TK.int()) for l in LAYERS]
    f = torch.stack([(o[0] != w_TK).any(1) | (o[1].long() != idx_TK).any(1) for o in out])
    return (f, torch.stack([torch.where(f[i, :, None], o[1].long(), 0) for i, o in enumerate(out)]),
            torch.stack([torch.where(f[i, :, None], o[0].float(), 0.0) for i, o in enumerate(out)]))


def vllm_steps(tables, prev, ids, valid, demoted):
    """Host selection (`pair_entries` over a step's rows) + device routing; baseline rows are padding."""
    from var_moe.vllm.rows import pair_entries

    state = vllm_state(tables)
    sel = pair_entries(state, valid.numpy(), prev.numpy(), ids.numpy())
    return vllm_route(state, ids, sel, valid), vllm_reference(tables, prev, ids, valid)


def vllm_decode(tables, prev, ids, valid, demoted):
    """A decode step: one row per request (previous token, token), the host's dict lookup per request;
    invalid rows are baseline requests."""
    from var_moe.vllm.rows import decode_entries

    state = vllm_state(tables)
    has = (prev >= 0).numpy()
    ids_RS = np.stack([np.where(has, prev.numpy(), ids.numpy()), ids.numpy()], 1)  # no previous: the token at 0
    sel, _ = (decode_entries(state, valid.numpy(), ids_RS, has.astype(np.int64)) if state.pair_entries
              else (None, None))
    return vllm_route(state, ids, sel, valid), vllm_reference(tables, prev, ids, valid)


def served_masks_offline(tables, prev, ids, valid, demoted):
    """Per layer, the offline served masks on evidence rows (valid rows only: evidence has no padding)."""
    from var_moe.var.pairs import served_masks

    keep = valid
    p, t = prev[keep], ids[keep]
    got_f, want_f = [], []
    ref = decide(ServedTables.from_tables(tables, LAYERS), t, torch.ones_like(t, dtype=torch.bool), p)
    ref_f = ref.fast_LT
    code_LT = set_codes(ref.idx_LTK.sort(-1).values.reshape(-1, K), E).reshape(len(LAYERS), -1)
    for slot, l in enumerate(LAYERS):
        rows = torch.stack([torch.zeros_like(t), p, t, code_LT[slot]], 1)
        ev = SimpleNamespace(rows_R4=rows, vocab=V, num_experts=E, top_k=K)
        m = served_masks(ev, tables.layers[l], tables.pair_tier.get(l))
        assert not bool((m["token_served"] & m["pair_served"]).any())
        assert torch.equal(m["token_agree"] | m["pair_agree"], m["token_served"] | m["pair_served"])
        got_f.append(m["token_served"] | m["pair_served"])
        want_f.append(ref_f[slot])
    z = torch.zeros(len(LAYERS), int(keep.sum()), K)
    return (torch.stack(got_f), z.long(), z), (torch.stack(want_f), z.long(), z)


def offload_var(tables, prev, ids, valid, demoted):
    """The offload `var` predictor: the token entries' sets (no pair entries: `var_pair` has those)."""
    from var_moe.offload.predictors import var_predict

    member = torch.stack([tables.layers[l].member_V for l in LAYERS]).numpy()
    experts = torch.stack([tables.layers[l].experts_VK for l in LAYERS]).numpy().astype(np.int16)
    ids_m = torch.where(valid, ids, -1)  # the trace marks what is not a token with -1
    trace = SimpleNamespace(token_ids_T=ids_m.numpy(), experts_TLK=np.zeros((T, len(LAYERS), K), np.int16))
    pred = torch.from_numpy(var_predict(trace, member, experts).astype(np.int64)).transpose(0, 1)
    f = (pred >= 0).all(-1)
    d = decide(ServedTables.from_tables(tables, LAYERS), ids_m, ids_m >= 0)  # no previous tokens: token entries only
    z = torch.zeros(len(LAYERS), T, K)
    return (f, torch.where(f[..., None], pred, 0), z), (d.fast_LT, torch.where(d.fast_LT[..., None], d.idx_LTK, 0), z)


CONSUMERS = {"builtin_general": builtin_general, "builtin_one_row": builtin_one_row, "vllm_steps": vllm_steps,
             "vllm_decode": vllm_decode, "served_masks": served_masks_offline, "offload_var": offload_var}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_consumer_decides_as_decide(consumer, kind):
    tables = random_tables(kind)
    prev, ids, valid = random_rows(tables, oov=consumer.startswith("builtin") or consumer == "offload_var")
    for demoted in (False, True) if consumer.startswith("builtin") else (False,):
        got, want = CONSUMERS[consumer](tables, prev, ids, valid, demoted)
        assert_same(got, want)
        if kind == "tokens_and_pairs":  # the random rows reach every kind of row
            assert bool(want[0].any())


def test_random_rows_reach_token_pair_and_shadowed_pair_rows():
    """The fixtures are not vacuous: token rows, pair rows, and pair entries a token entry shadows."""
    tables = random_tables("tokens_and_pairs")
    prev, ids, valid = random_rows(tables)
    served = ServedTables.from_tables(tables, LAYERS)
    d = decide(served, ids, valid, prev)
    assert int(d.token_LT.sum()) > 20 and int(d.pair_LT.sum()) > 20
    no_token = decide(ServedTables.build({}, tables.pair_tier, LAYERS, {}, V, K), ids, valid, prev)
    assert int((no_token.pair_LT & d.token_LT).sum()) > 5  # token entries won these
    assert not bool((d.token_LT & d.pair_LT).any()) and not bool(d.fast_LT[:, ~valid].any())


def test_server_request_counts_sum_the_decision():
    tables = random_tables("tokens_and_pairs")
    served = ServedTables.from_tables(tables, LAYERS)
    _, ids, _ = random_rows(tables, oov=False)
    seq = ids.tolist()
    for start in (0, 5):
        prev_id = seq[start - 1] if start else -1
        want = decide(served, torch.tensor(seq[start:]), torch.ones(T - start, dtype=torch.bool),
                      torch.tensor([prev_id] + seq[start:-1])).fast_LT.sum()
        got = tier_counts(served, seq[start:], prev_id)
        assert got == {"fast": int(want), "learned": (T - start) * len(LAYERS) - int(want)}
