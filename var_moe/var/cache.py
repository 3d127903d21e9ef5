"""Context cache of one layer: (last W tokens, token) -> a learned top-k decision, LRU with a TTL.

Why tensors and not a dict: a forward brings thousands of keys per layer; with a dict every key is
a Python-level lookup and the keys must come to the host (`.tolist()`). Here the cache is one
int64 tensor kept sorted by key, so a lookup is one `searchsorted` and an insert a merge of the
new rows into it (two `searchsorted` and one `index_select`, no re-sort), vectorised and
device-agnostic (no host round trip on a GPU). Measured on CPU (`python -m benchmarks.var_cache`,
1 thread, median per forward-layer): 2,048 tokens into 10k entries 1.1-1.2 ms vs 0.65-0.68 ms for
a dict built from one `.tolist()`; a 4-token decode step into a full cache 322 us vs 20-26 us (the
tensor version pays a fixed few dozen ops per call). It is kept for device independence.

Keys never collide silently: the int64 key is an exact mixed-radix encoding of the W+1 token ids
(base V+1, ids >= -1) when (V+1)^(W+1) fits in 62 bits; otherwise a multiplicative hash. In both
cases the full key (W+1 ids) is stored and compared on every hit, so a hash collision can only
cause a miss (or replace the older entry), never a wrong decision. Because the key holds the row's
own context (from `TokenTracker`, which never mixes rows or sequences), nothing leaks across rows.

Confirmation: with `min_confirmations` = m > 0 an entry is served only after m later learned
decisions for the same key chose the same expert set (a different set restarts the count), so a
decision seen once in one context is not repeated in others. m = 0 is the seed's behaviour.

Expiry: an entry older than `ttl_steps` forward steps or `ttl_seconds` seconds is a miss and is
purged on the next insert. Capacity: when full, the least recently used entries go (ties: oldest).
Test: `pytest tests/test_var_cache.py`.
"""

from __future__ import annotations

import math

import torch

_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # golden-ratio constant as a signed int64


def encode_keys(full_TW: torch.Tensor, vocab: int) -> torch.Tensor:
    """int64 key per row of (W+1) token ids in [-1, vocab)."""
    base = vocab + 1
    w = full_TW.shape[1]
    shifted = full_TW + 1  # -1 (no token) -> 0
    if w * math.log2(base) < 62:  # exact: mixed-radix number, no collisions possible
        powers = torch.tensor([base**i for i in range(w)], dtype=torch.long, device=full_TW.device)
        return (shifted * powers).sum(1)
    h = torch.zeros(full_TW.shape[0], dtype=torch.long, device=full_TW.device)
    for i in range(w):  # loop over the window positions (<= 64), not over tokens
        h = (h ^ shifted[:, i]) * _MIX  # int64 multiply wraps: a cheap mixing hash
        h = h ^ (h >> 29)
    return h


class ContextCache:
    """All entries live in one int64 tensor `data_CN` (one row per entry, kept sorted by key), so
    eviction, expiry and the merge of new rows are a few index operations each. Columns: key | full key (W+1) |
    experts (K) | weights (K, float64 bits) | born step | born time (float64 bits) | last use |
    confirmations (later learned decisions for the key that chose the same set)."""

    def __init__(self, capacity: int, width: int, k: int, vocab: int, ttl_steps: int | None = None,
                 ttl_seconds: float | None = None, device: torch.device | str = "cpu", min_confirmations: int = 0):
        self.capacity, self.width, self.k, self.vocab = capacity, width, k, vocab
        self.min_confirmations = min_confirmations
        self.ttl_steps, self.ttl_seconds = ttl_steps, ttl_seconds
        self.device = torch.device(device)
        w = width
        self._full = slice(1, 1 + w)
        self._experts = slice(1 + w, 1 + w + k)
        self._weights = slice(1 + w + k, 1 + w + 2 * k)
        self._born_step, self._born_time, self._used = 1 + w + 2 * k, 2 + w + 2 * k, 3 + w + 2 * k
        self._conf = 4 + w + 2 * k
        self.ncols = 5 + w + 2 * k
        self.clear()

    def clear(self) -> None:
        self.data_CN = torch.empty(0, self.ncols, dtype=torch.long, device=self.device)
        self.keys_C = torch.empty(0, dtype=torch.long, device=self.device)
        self._tick = 0

    def __len__(self) -> int:
        return int(self.keys_C.shape[0])

    def _alive(self, rows_N: torch.Tensor, step: int, now: float) -> torch.Tensor:
        alive = torch.ones(rows_N.shape[0], dtype=torch.bool, device=rows_N.device)
        if self.ttl_steps is not None:
            alive &= (step - rows_N[:, self._born_step]) <= self.ttl_steps
        if self.ttl_seconds is not None:
            alive &= (now - rows_N[:, self._born_time].view(torch.float64)) <= self.ttl_seconds
        return alive

    def lookup(self, full_TW: torch.Tensor, step: int, now: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hit_T, experts_TK, weights_TK); rows without a hit hold garbage in experts/weights."""
        t = full_TW.shape[0]
        self._tick += 1
        if len(self) == 0 or t == 0:
            return (torch.zeros(t, dtype=torch.bool, device=full_TW.device),
                    torch.zeros(t, self.k, dtype=torch.long, device=full_TW.device),
                    torch.zeros(t, self.k, dtype=torch.float32, device=full_TW.device))
        q_T = encode_keys(full_TW, self.vocab)
        pos_T = torch.searchsorted(self.keys_C, q_T).clamp_max(len(self) - 1)
        rows_TN = self.data_CN[pos_T]
        hit_T = (rows_TN[:, 0] == q_T) & (rows_TN[:, self._full] == full_TW).all(1) & self._alive(rows_TN, step, now)
        hit_T &= rows_TN[:, self._conf] >= self.min_confirmations  # unconfirmed entries are candidates only
        self.data_CN[pos_T[hit_T], self._used] = self._tick
        weights = rows_TN[:, self._weights].contiguous().view(torch.float64).float()
        return hit_T, rows_TN[:, self._experts], weights

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
        keep_C = self._alive(self.data_CN, step, now)  # expired entries go
        if len(self):  # a key seen again with the same expert set gains a confirmation; another set restarts it
            pos = torch.searchsorted(self.keys_C, uniq).clamp_max(len(self) - 1)
            old = self.data_CN[pos]
            found = old[:, 0] == uniq
            same = found & (old[:, self._full] == full_NW[last]).all(1) & self._alive(old, step, now)
            same &= (old[:, self._experts].sort(1).values == new_experts.sort(1).values).all(1)
            conf_N = torch.where(same, old[:, self._conf] + 1, conf_N)
            keep_C[pos[found]] = False  # the new row replaces the old one of the same key
        new_NN = torch.cat([
            q_N[last, None], full_NW[last].long(), new_experts,
            weights_NK[last].double().view(torch.long),
            torch.full((n, 1), step, dtype=torch.long, device=dev),
            torch.tensor([now], dtype=torch.float64, device=dev).view(torch.long).expand(n, 1),
            torch.full((n, 1), self._tick, dtype=torch.long, device=dev),
            conf_N[:, None],
        ], dim=1)
        if n > self.capacity:
            # More new keys than room. LRU order (last use, then position in key order) keeps the
            # newest rows; they all share this tick, so the last `capacity` keys in key order stay.
            new_NN, n = new_NN[n - self.capacity:], self.capacity
            keep_C = torch.zeros_like(keep_C)
        over = int(keep_C.sum()) + n - self.capacity
        if over > 0:
            # Every new row was used at this insert's tick, later than any kept entry, so LRU evicts
            # the `over` kept entries with the lowest (last use, position in key order).
            rank_C = self.data_CN[:, self._used] * (len(self) + 1) + torch.arange(len(self), device=dev)
            rank_C = torch.where(keep_C, rank_C, torch.iinfo(torch.long).max)
            keep_C[torch.topk(rank_C, over, largest=False).indices] = False
        self.data_CN = self._merge(keep_C, new_NN)
        self.keys_C = self.data_CN[:, 0].contiguous()

    def _merge(self, keep_C: torch.Tensor, new_NN: torch.Tensor) -> torch.Tensor:
        """The kept rows of the key-sorted table merged with the key-sorted new rows (disjoint keys).

        Why not concatenate and argsort: the table holds up to `capacity` rows and a decode step
        inserts a handful; argsort of 10k keys alone costs ~0.3 ms per layer and step on CPU. Here
        two searchsorted give every row its place and one index_select moves the rows (about 3x
        cheaper on CPU than boolean or scatter indexing of 2-D rows).
        """
        kept_C = keep_C.nonzero().squeeze(1)
        if kept_C.numel() == 0:
            return new_NN
        dev, c, n = new_NN.device, kept_C.numel(), new_NN.shape[0]
        old_keys, new_keys = self.keys_C.index_select(0, kept_C), new_NN[:, 0].contiguous()
        src = torch.empty(c + n, dtype=torch.long, device=dev)  # output row -> row of cat(data_CN, new_NN)
        src[torch.arange(c, device=dev) + torch.searchsorted(new_keys, old_keys)] = kept_C
        new_rows = len(self) + torch.arange(n, device=dev)
        src[torch.arange(n, device=dev) + torch.searchsorted(old_keys, new_keys)] = new_rows
        return torch.cat([self.data_CN, new_NN]).index_select(0, src)
