"""Context cache: exact hits, TTL in steps and seconds, capacity with LRU eviction, and no wrong
answers under forced hash collisions. Run: `pytest tests/test_var_cache.py`."""

import torch

from var_moe.var.cache import ContextCache, encode_keys


def _entry(ids, k=2):
    full = torch.tensor(ids, dtype=torch.long)
    experts = (full.sum(1, keepdim=True) + torch.arange(k)) % 8
    return full, experts, torch.full((len(ids), k), 0.5)


def test_hit_and_miss():
    c = ContextCache(10, 2, 2, vocab=50)
    full, ex, w = _entry([[1, 2], [-1, 3]])
    c.insert(full, ex, w, step=1, now=0.0)
    hit, got, _ = c.lookup(torch.tensor([[1, 2], [2, 1], [-1, 3], [0, 3]]), step=2, now=0.0)
    assert hit.tolist() == [True, False, True, False]
    assert torch.equal(got[hit], ex)


def test_ttl_steps_and_seconds():
    c = ContextCache(10, 2, 2, vocab=50, ttl_steps=3)
    full, ex, w = _entry([[1, 2]])
    c.insert(full, ex, w, step=10, now=0.0)
    assert c.lookup(full, step=13, now=0.0)[0].item()
    assert not c.lookup(full, step=14, now=0.0)[0].item()
    c = ContextCache(10, 2, 2, vocab=50, ttl_seconds=1.5)
    c.insert(full, ex, w, step=0, now=100.0)
    assert c.lookup(full, step=99, now=101.4)[0].item()
    assert not c.lookup(full, step=99, now=101.6)[0].item()
    c.insert(_entry([[5, 5]])[0], *_entry([[5, 5]])[1:], step=0, now=101.6)  # purges the expired entry
    assert len(c) == 1


def test_capacity_lru():
    c = ContextCache(3, 2, 2, vocab=50)
    for i, row in enumerate([[1, 1], [2, 2], [3, 3]]):
        c.insert(*_entry([row]), step=i, now=0.0)
    c.lookup(torch.tensor([[1, 1]]), step=4, now=0.0)  # [1,1] becomes most recently used
    c.insert(*_entry([[4, 4]]), step=5, now=0.0)  # evicts [2,2], the least recently used
    hit, _, _ = c.lookup(torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4]]), step=6, now=0.0)
    assert hit.tolist() == [True, False, True, True]
    assert len(c) == 3


def test_duplicate_keys_in_one_insert_keep_latest():
    c = ContextCache(10, 2, 2, vocab=50)
    full = torch.tensor([[1, 2], [1, 2]])
    c.insert(full, torch.tensor([[0, 1], [2, 3]]), torch.ones(2, 2), step=1, now=0.0)
    hit, got, _ = c.lookup(full[:1], step=2, now=0.0)
    assert hit.item() and got[0].tolist() == [2, 3] and len(c) == 1


def test_exact_encoding_is_injective():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-1, 9, (4000, 3), generator=g).unique(dim=0)
    assert encode_keys(rows, vocab=9).unique().numel() == rows.shape[0]


def test_hash_mode_never_returns_a_wrong_decision(monkeypatch):
    import var_moe.var.cache as cache_mod

    monkeypatch.setattr(cache_mod, "encode_keys", lambda full, vocab: full[:, 0] % 2)  # massive collisions
    c = ContextCache(100, 2, 2, vocab=50)
    full, ex, w = _entry([[1, 7], [3, 9]])
    c.insert(full, ex, w, step=1, now=0.0)
    hit, got, _ = c.lookup(torch.tensor([[1, 7], [5, 7], [3, 9], [3, 8]]), step=2, now=0.0)
    # same hash as a stored key but a different full key: a miss, never the other entry's decision
    assert hit.tolist()[1] is False and hit.tolist()[3] is False
    assert all(torch.equal(got[i], ex[j]) for i, j in ((0, 0), (2, 1)) if hit[i])


def test_wide_keys_use_hash_and_still_verify():
    c = ContextCache(10, 8, 2, vocab=50_000)  # 50001^8 does not fit in int64
    full = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    c.insert(full, torch.tensor([[0, 1]]), torch.ones(1, 2), step=1, now=0.0)
    other = full.clone()
    other[0, 0] = 9
    hit, _, _ = c.lookup(torch.cat([full, other]), step=2, now=0.0)
    assert hit.tolist() == [True, False]


def test_confirmations_gate_serving():
    c = ContextCache(10, 2, 2, vocab=50, min_confirmations=1)
    full = torch.tensor([[1, 2]])
    c.insert(full, torch.tensor([[0, 1]]), torch.ones(1, 2), step=1, now=0.0)
    assert not c.lookup(full, step=2, now=0.0)[0].item()  # a candidate, not served yet
    c.insert(full, torch.tensor([[1, 0]]), torch.ones(1, 2), step=2, now=0.0)  # same set (order irrelevant)
    assert c.lookup(full, step=3, now=0.0)[0].item()
    c.insert(full, torch.tensor([[2, 3]]), torch.ones(1, 2), step=3, now=0.0)  # another set restarts the count
    assert not c.lookup(full, step=4, now=0.0)[0].item()
