"""Context cache of one layer: (last W tokens, token) -> a learned top-k decision, LRU with a TTL.

Why tensors and not a dict: a forward brings thousands of keys per layer; with a dict every key is
a Python-level lookup. Here the cache is a handful of tensors kept sorted by an int64 key, so a
lookup is one `searchsorted` and an insert one concatenation + sort of at most capacity + T rows,
all vectorised and device-agnostic (no `.tolist()` at all). `benchmarks/var_cache.py` measures it.

Keys never collide silently: the int64 key is an exact mixed-radix encoding of the W+1 token ids
(base V+1, ids >= -1) when (V+1)^(W+1) fits in 63 bits; otherwise a multiplicative hash. In both
cases the full key (W+1 ids) is stored and compared on every hit, so a hash collision can only
cause a miss (or replace the older entry), never a wrong decision. Because the key holds the row's
own context (from `TokenTracker`, which never mixes rows or sequences), nothing leaks across rows.

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
    def __init__(self, capacity: int, width: int, k: int, vocab: int, ttl_steps: int | None = None,
                 ttl_seconds: float | None = None, device: torch.device | str = "cpu"):
        self.capacity, self.width, self.k, self.vocab = capacity, width, k, vocab
        self.ttl_steps, self.ttl_seconds = ttl_steps, ttl_seconds
        self.device = torch.device(device)
        self.clear()

    def clear(self) -> None:
        d = self.device
        self.keys_C = torch.empty(0, dtype=torch.long, device=d)
        self.full_CW = torch.empty(0, self.width, dtype=torch.long, device=d)
        self.experts_CK = torch.empty(0, self.k, dtype=torch.long, device=d)
        self.weights_CK = torch.empty(0, self.k, dtype=torch.float32, device=d)
        self.born_step_C = torch.empty(0, dtype=torch.long, device=d)
        self.born_time_C = torch.empty(0, dtype=torch.float64, device=d)
        self.used_C = torch.empty(0, dtype=torch.long, device=d)
        self._tick = 0

    def __len__(self) -> int:
        return int(self.keys_C.shape[0])

    def _alive(self, step: int, now: float) -> torch.Tensor:
        alive = torch.ones_like(self.keys_C, dtype=torch.bool)
        if self.ttl_steps is not None:
            alive &= (step - self.born_step_C) <= self.ttl_steps
        if self.ttl_seconds is not None:
            alive &= (now - self.born_time_C) <= self.ttl_seconds
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
        hit_T = (self.keys_C[pos_T] == q_T) & (self.full_CW[pos_T] == full_TW).all(1) & self._alive(step, now)[pos_T]
        self.used_C[pos_T[hit_T]] = self._tick
        return hit_T, self.experts_CK[pos_T], self.weights_CK[pos_T]

    def insert(self, full_NW: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor, step: int, now: float) -> None:
        if self.capacity == 0 or full_NW.shape[0] == 0:
            return
        self._tick += 1
        q_N = encode_keys(full_NW, self.vocab)
        # one entry per key within the batch: the last occurrence wins (latest decision)
        uniq, inv = torch.unique(q_N, return_inverse=True)
        last = torch.full_like(uniq, -1).scatter_reduce(0, inv, torch.arange(len(q_N), device=q_N.device), "amax")
        q_N, full_NW, experts_NK, weights_NK = q_N[last], full_NW[last], experts_NK[last], weights_NK[last]
        n = q_N.shape[0]
        keep_C = self._alive(step, now) & ~torch.isin(self.keys_C, q_N)  # replaced keys and expired entries go
        cat = lambda old, new: torch.cat([old[keep_C], new])  # noqa: E731
        keys = cat(self.keys_C, q_N)
        full = cat(self.full_CW, full_NW)
        experts = cat(self.experts_CK, experts_NK.long())
        weights = cat(self.weights_CK, weights_NK.float())
        born_step = cat(self.born_step_C, torch.full((n,), step, dtype=torch.long, device=q_N.device))
        born_time = cat(self.born_time_C, torch.full((n,), now, dtype=torch.float64, device=q_N.device))
        used = cat(self.used_C, torch.full((n,), self._tick, dtype=torch.long, device=q_N.device))
        if keys.shape[0] > self.capacity:
            # LRU: keep the most recently used; among equals, the youngest (stable sort keeps order)
            order = torch.sort(used * (keys.shape[0] + 1) + torch.arange(keys.shape[0], device=keys.device), descending=True).indices
            sel = order[: self.capacity]
            keys, full, experts, weights = keys[sel], full[sel], experts[sel], weights[sel]
            born_step, born_time, used = born_step[sel], born_time[sel], used[sel]
        order = torch.argsort(keys)
        self.keys_C, self.full_CW, self.experts_CK, self.weights_CK = keys[order], full[order], experts[order], weights[order]
        self.born_step_C, self.born_time_C, self.used_C = born_step[order], born_time[order], used[order]
