"""The per-step VAR decision of the vLLM integration (var_moe/vllm/routing.py, rows.py), without
vLLM: baseline rows or non-member tokens give the learned decision back bit for bit, VAR rows of
member tokens get the table's experts and weights, the device counters (fast, learned, audit
agree/disagree; VAR rows only) match a brute-force count, and per-request modes become per-token
rows in the runner's order. Runs in both environments. Test: `pytest tests/test_vllm_routing.py`.
"""

from __future__ import annotations

import torch

from types import SimpleNamespace

import numpy as np

from var_moe.vllm.routing import COUNTERS, LayerVar, VarState, _same_set
from var_moe.vllm.rows import MODE_KEY, RowWriter, request_modes, token_rows


def make_layer(vocab: int = 50, k: int = 2, e: int = 8, seed: int = 0) -> LayerVar:
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(vocab)])
    weights = torch.rand(vocab, k, generator=g)
    weights = weights / weights.sum(1, keepdim=True)
    member = torch.rand(vocab, generator=g) < 0.4
    return LayerVar(0, torch.nn.Linear(4, e), experts, weights, member, torch.zeros(len(COUNTERS), dtype=torch.long),
                    True, e)


def learned(t: int, k: int = 2, e: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(t, e, generator=g), -1)
    w, idx = probs.topk(k, dim=1)
    return (w / w.sum(1, keepdim=True)).float(), idx.int()


def test_same_set_matches_sorted_comparison():
    g = torch.Generator().manual_seed(3)
    a = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(200)])
    b = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(200)])
    b[::3] = a[::3].flip(1)  # same sets in another order
    expect = (a.sort(1).values == b.sort(1).values).all(1)
    assert torch.equal(_same_set(a, b, 8), expect)
    assert torch.equal(_same_set(a, b, 128), expect)  # the sorted path for many experts
    assert bool(expect.any()) and not bool(expect.all())


def test_baseline_rows_give_learned_back_and_var_rows_take_table_rows():
    lv, state = make_layer(), VarState(torch.device("cpu"), max_tokens=100)
    ids = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(2))
    w, idx = learned(64)
    out_w, out_idx = lv.route(state, ids, w, idx)
    assert torch.equal(out_w, w) and torch.equal(out_idx, idx)  # every row baseline: bit for bit
    assert lv.counts.tolist() == [0, 0, 0, 0]  # baseline rows are not VAR traffic
    rows = torch.arange(64) % 3 != 0  # a mixed batch: every third row baseline
    state.rows_N[:64] = rows
    out_w, out_idx = lv.route(state, ids, w, idx)
    use = lv.member_V[ids] & rows
    assert torch.equal(out_idx[use], lv.experts_VK[ids][use].int())
    assert torch.equal(out_w[use], lv.weights_VK[ids][use])
    assert torch.equal(out_idx[~use], idx[~use]) and torch.equal(out_w[~use], w[~use])
    same = (lv.experts_VK[ids].sort(1).values == idx.long().sort(1).values).all(1)
    fast, learned_n, agree, disagree = lv.counts.tolist()
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


def test_loading_tables_with_pair_entries_says_they_are_not_served(tmp_path):
    """The vLLM path serves token entries only; a tables file with (previous, token) entries loads,
    and the reply counts the entries it does not serve instead of dropping them silently."""
    from var_moe.adapters import get_adapter
    from var_moe.tiny import tiny_model
    from var_moe.var.evidence import set_codes
    from var_moe.var.pairs import PairTable
    from var_moe.var.tables import VARTables, model_identity
    from var_moe.vllm.tables import load_tables

    model = tiny_model("mixtral", seed=0)
    adapter = get_adapter(model)
    layers = list(range(model.config.num_hidden_layers))
    tables = VARTables.empty(model, adapter, layers)
    v, k, e = model.config.vocab_size, model.config.num_experts_per_tok, model.config.num_local_experts
    sets = torch.tensor([[0, 1], [2, 3], [1, 2]])
    tables.pair_tier = {layers[0]: PairTable(torch.tensor([5 * v + 7, 6 * v + 7, 9 * v + 1]), sets,
                                             torch.full((3, k), 0.5), torch.ones(3), set_codes(sets, e),
                                             torch.full((3,), 0.95), torch.full((3,), 50.0, dtype=torch.float64),
                                             torch.full((3,), 50.0, dtype=torch.float64))}
    path = tables.save(tmp_path / "tables.safetensors")
    state = VarState(torch.device("cpu"), max_tokens=16)
    for l in layers:
        state.layers[l] = LayerVar(l, torch.nn.Linear(4, e), torch.zeros(v, k, dtype=torch.long),
                                   torch.zeros(v, k), torch.zeros(v, dtype=torch.bool),
                                   torch.zeros(len(COUNTERS), dtype=torch.long), True, e)
    state.identity = {**model_identity(model, adapter), "layers": layers}
    reply = load_tables(state, path)
    assert reply["pair_entries_not_served"] == 3
    VARTables.empty(model, adapter, layers).save(tmp_path / "plain.safetensors")
    assert load_tables(state, tmp_path / "plain.safetensors")["pair_entries_not_served"] == 0
