"""HashIndex: int64 keys -> dense entry numbers (insertion order), as vectorized tensor code.

The sparse capture statistics keep one value per *observed* key (a (layer, token, expert) cell,
a (layer, token, top-k set) count) in plain arrays indexed by entry number; this index finds the
entry of every key of a batch at once. Open addressing with linear probing in a power-of-two
table kept at most a quarter full: a lookup is one gather for almost every key (a few more rounds for
the colliding ones), no sorting, no Python loop over keys. New keys are placed by rounds of
scatter: keys that find a free slot write their entry number, keys whose write lost a race or
whose slot is taken move one slot on -- the same layout as inserting them one at a time.

Works on any device (the probe loop reads one count per round). Entries are never removed; a
caller that prunes rebuilds the index from the keys it keeps (`HashIndex.build`).
Shapes: Q queries, N entries, H table slots. Test: `pytest tests/test_capture_sparse.py`.
"""

from __future__ import annotations

import torch

_MULT = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64 (Fibonacci hashing)
_LOAD = 4  # table slots per entry at least: short probe chains (few probe rounds per batch)


class HashIndex:
    def __init__(self, device: str | torch.device = "cpu", expected: int = 1024):
        self.device = torch.device(device)
        # keys_N[0] is a sentinel (-1, never a key: keys are >= 0); entry i is stored at i + 1 and the
        # table holds i + 1, 0 = empty, so a probe reads keys_N[table[slot]] without a bounds fix-up
        self.keys_N = torch.full((max(expected, 16) + 1,), -1, dtype=torch.long, device=self.device)
        self.n = 0
        self._alloc_table(max(expected, 16))

    def _alloc_table(self, entries: int) -> None:
        bits = max(5, (_LOAD * entries - 1).bit_length())
        self.bits = bits
        self.table_H = torch.zeros(1 << bits, dtype=torch.long, device=self.device)

    def _slots(self, key_Q: torch.Tensor) -> torch.Tensor:
        # Fibonacci hashing: the top `bits` bits of key * 2**64 / golden ratio (the int64 product
        # wraps; the arithmetic shift's sign bits are masked off): consecutive keys such as
        # row * E + e land far apart, so linear-probing chains stay short
        return ((key_Q * _MULT) >> (64 - self.bits)) & ((1 << self.bits) - 1)

    @property
    def keys(self) -> torch.Tensor:
        """(N,) the keys in entry order."""
        return self.keys_N[1: self.n + 1]

    def __len__(self) -> int:
        return self.n

    def nbytes(self) -> int:
        return (self.keys_N.numel() + self.table_H.numel()) * 8

    def lookup(self, key_Q: torch.Tensor) -> torch.Tensor:
        """(Q,) entry number of every key, -1 where the key is not in the index."""
        if self.n == 0 or key_Q.numel() == 0:
            return torch.full_like(key_Q, -1)
        # index_select, not advanced indexing: the latter is ~20x slower for 1-D gathers on CPU
        pos_Q = self._slots(key_Q)
        e_Q = self.table_H.index_select(0, pos_Q)
        hit = self.keys_N.index_select(0, e_Q) == key_Q
        act = (~hit & (e_Q > 0)).nonzero().squeeze(1)  # collided: probe on
        out = e_Q.sub_(1).masked_fill_(~hit, -1)
        mask = (1 << self.bits) - 1
        while act.numel():
            k, p = key_Q.index_select(0, act), (pos_Q.index_select(0, act) + 1) & mask
            e = self.table_H.index_select(0, p)
            hit = self.keys_N.index_select(0, e) == k
            out.index_copy_(0, act[hit], e[hit] - 1)
            go_on = (e > 0) & ~hit
            act = act[go_on]
            pos_Q.index_copy_(0, act, p[go_on])
        return out

    def insert(self, key_Q: torch.Tensor) -> torch.Tensor:
        """(Q,) entry number of every key (>= 0), adding the keys not yet present (duplicates allowed)."""
        idx_Q = self.lookup(key_Q)
        miss = idx_Q < 0
        if not bool(miss.any()):
            return idx_Q
        new_U, inv = torch.unique(key_Q[miss], return_inverse=True)
        first = self.n
        self._append(new_U)
        idx_Q[miss] = first + inv
        return idx_Q

    def _append(self, new_U: torch.Tensor) -> None:
        """Add keys known to be absent and distinct; grows the arrays and the table as needed."""
        u = new_U.numel()
        if self.n + u + 1 > self.keys_N.numel():
            grown = torch.full((max(2 * self.keys_N.numel(), self.n + u + 1),), -1, dtype=torch.long, device=self.device)
            grown[: self.n + 1] = self.keys_N[: self.n + 1]
            self.keys_N = grown
        self.keys_N[self.n + 1: self.n + u + 1] = new_U
        ids_U = torch.arange(self.n + 1, self.n + u + 1, device=self.device)  # stored numbers: entry + 1
        self.n += u
        if _LOAD * self.n > self.table_H.numel():  # keep the load at most 1/_LOAD: rehash everything
            self._alloc_table(2 * self.n)
            self._place(self.keys, torch.arange(1, self.n + 1, device=self.device))
        else:
            self._place(new_U, ids_U)

    def _place(self, key_U: torch.Tensor, ids_U: torch.Tensor) -> None:
        mask = (1 << self.bits) - 1
        pos, ids = self._slots(key_U), ids_U
        while ids.numel():
            free = self.table_H.index_select(0, pos) == 0
            if bool(free.all()):
                p_free, id_free = pos, ids
                blocked_pos = blocked_ids = pos[:0]
            else:
                p_free, id_free = pos[free], ids[free]
                blocked_pos, blocked_ids = pos[~free], ids[~free]
            self.table_H.index_copy_(0, p_free, id_free)  # colliding writes: one of them wins
            lost = self.table_H.index_select(0, p_free) != id_free
            if bool(lost.any()):
                blocked_pos = torch.cat([blocked_pos, p_free[lost]])
                blocked_ids = torch.cat([blocked_ids, id_free[lost]])
            pos, ids = (blocked_pos + 1) & mask, blocked_ids

    @classmethod
    def build(cls, keys_N: torch.Tensor, device: str | torch.device = "cpu") -> "HashIndex":
        """An index over distinct keys, entry i = keys_N[i]."""
        out = cls(device, expected=keys_N.numel())
        if keys_N.numel():
            keys_N = keys_N.to(out.device).long()
            if bool((keys_N < 0).any()):
                raise ValueError("hash index keys must be >= 0")
            out._append(keys_N)
        return out
