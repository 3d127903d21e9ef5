"""The per-step VAR decision of the vLLM integration (var_moe/vllm/routing.py), without vLLM:
flag off or non-member tokens give the learned decision back bit for bit, member tokens get the
table's experts and weights, and the device counters (fast, learned, audit agree/disagree) match a
brute-force count. Runs in both environments. Test: `pytest tests/test_vllm_routing.py`.
"""

from __future__ import annotations

import torch

from var_moe.vllm.routing import COUNTERS, LayerVar, VarState, _same_set


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


def test_flag_off_gives_learned_back_and_flag_on_takes_table_rows():
    lv, state = make_layer(), VarState(torch.device("cpu"))
    ids = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(2))
    w, idx = learned(64)
    out_w, out_idx = lv.route(state, ids, w, idx)
    assert torch.equal(out_w, w) and torch.equal(out_idx, idx)  # flag off: bit for bit
    assert lv.counts.tolist()[:2] == [0, 64]
    state.flag.fill_(True)
    out_w, out_idx = lv.route(state, ids, w, idx)
    member = lv.member_V[ids]
    assert torch.equal(out_idx[member], lv.experts_VK[ids][member].int())
    assert torch.equal(out_w[member], lv.weights_VK[ids][member])
    assert torch.equal(out_idx[~member], idx[~member]) and torch.equal(out_w[~member], w[~member])
    same = (lv.experts_VK[ids].sort(1).values == idx.long().sort(1).values).all(1)
    fast, learned_n, agree, disagree = (lv.counts - torch.tensor([0, 64, 0, 0])).tolist()
    assert fast == int(member.sum()) and learned_n == 64 - fast
    assert agree == int((member & same).sum()) and disagree == fast - agree
