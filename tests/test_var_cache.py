"""Context cache: exact hits, TTL in steps and seconds, capacity with LRU eviction, no wrong answers
under forced hash collisions, and the merging insert equal to the re-sorting one it replaced.
Run: `pytest tests/test_var_cache.py`."""

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



class _SortedReference(ContextCache):
    """The previous insert: concatenate the new rows, LRU-sort when over capacity, re-sort by key."""

    def insert(self, full_NW: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor, step: int, now: float) -> None:
        if self.capacity == 0 or full_NW.shape[0] == 0:
            return
        self._tick += 1
        q_N = encode_keys(full_NW, self.vocab)
        # one entry per key within the batch: the last occurrence wins (latest decision)
        uniq, inv = torch.unique(q_N, return_inverse=True)
        last = torch.full_like(uniq, -1).scatter_reduce(0, inv, torch.arange(len(q_N), device=q_N.device), "amax")
        n = uniq.shape[0]
        dev = q_N.device
        new_experts = experts_NK[last].long()
        conf_N = torch.zeros(n, dtype=torch.long, device=dev)
        if len(self):  # a key seen again with the same expert set gains a confirmation; another set restarts it
            pos = torch.searchsorted(self.keys_C, uniq).clamp_max(len(self) - 1)
            old = self.data_CN[pos]
            same = (old[:, 0] == uniq) & (old[:, self._full] == full_NW[last]).all(1) & self._alive(old, step, now)
            same &= (old[:, self._experts].sort(1).values == new_experts.sort(1).values).all(1)
            conf_N = torch.where(same, old[:, self._conf] + 1, conf_N)
        new_NN = torch.cat([
            q_N[last, None], full_NW[last].long(), new_experts,
            weights_NK[last].double().view(torch.long),
            torch.full((n, 1), step, dtype=torch.long, device=dev),
            torch.tensor([now], dtype=torch.float64, device=dev).view(torch.long).expand(n, 1),
            torch.full((n, 1), self._tick, dtype=torch.long, device=dev),
            conf_N[:, None],
        ], dim=1)
        # replaced keys and expired entries go
        keep_C = self._alive(self.data_CN, step, now) & ~torch.isin(self.keys_C, uniq)
        data = torch.cat([self.data_CN[keep_C], new_NN])
        if data.shape[0] > self.capacity:
            # LRU: keep the most recently used; among equals the later rows (younger entries)
            rank = data[:, self._used] * (data.shape[0] + 1) + torch.arange(data.shape[0], device=dev)
            data = data[torch.sort(rank, descending=True).indices[: self.capacity]]
        self.data_CN = data[torch.argsort(data[:, 0])]
        self.keys_C = self.data_CN[:, 0].contiguous()


def test_merge_insert_equals_the_re_sorting_reference():
    """Random lookups and inserts (repeated keys, expiry, overflow, batches larger than the cache):
    after every step the merging insert leaves exactly the table the re-sorting insert leaves, and
    every lookup answers the same."""
    g = torch.Generator().manual_seed(7)
    for capacity, ttl in ((5, 4), (17, None), (40, 9)):
        fast = ContextCache(capacity, 2, 2, vocab=12, ttl_steps=ttl, min_confirmations=1)
        ref = _SortedReference(capacity, 2, 2, vocab=12, ttl_steps=ttl, min_confirmations=1)
        for step in range(1, 150):
            n = int(torch.randint(1, 3 * capacity if step % 17 == 0 else 6, (1,), generator=g))
            full = torch.randint(-1, 12, (n, 2), generator=g)
            experts = torch.randint(0, 4, (n, 2), generator=g)
            weights = torch.rand(n, 2, generator=g)
            query = torch.randint(-1, 12, (7, 2), generator=g)
            got, want = fast.lookup(query, step, 0.0), ref.lookup(query, step, 0.0)
            assert torch.equal(got[0], want[0]), (capacity, step)
            assert torch.equal(got[1][got[0]], want[1][want[0]]) and torch.equal(got[2][got[0]], want[2][want[0]])
            fast.insert(full, experts, weights, step, 0.0)
            ref.insert(full, experts, weights, step, 0.0)
            assert torch.equal(fast.data_CN, ref.data_CN), (capacity, step)
            assert torch.equal(fast.keys_C, ref.keys_C)
