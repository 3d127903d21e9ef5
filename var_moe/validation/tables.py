"""Exact (previous token, token) -> top-k set counts and the modal-set tables built from them.

`SetCounter` accumulates, for one layer, how often each (prev, token, sorted top-k set) row
occurred, with `torch.unique(dim=0)` + `index_add_` (vectorised; pending rows are consolidated
once they pass a size bound, so memory is O(distinct rows), not O(tokens)). `finalize()` gives a
`ModalTables`:

- `token_sets_VK`: each token's modal top-k set (-1 rows for tokens never seen),
- `pair_keys_P` / `pair_sets_PK`: modal set of each (prev, token) pair seen >= `min_pair_count`
  times, keyed by prev * V + token and sorted for `searchsorted`,
- `global_set_K`: the single most frequent set.

Ties between equally frequent sets go to the lexicographically smallest sorted set (the order
`torch.unique` produces), so results are deterministic. Shapes: T tokens, K top-k, V vocabulary,
P pairs, R distinct rows. Test: `pytest tests/test_validation_predictability.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidInputError

_CONSOLIDATE_ROWS = 2_000_000  # pending rows before an intermediate unique (bounds memory)


def modal_rows(keys_RC: torch.Tensor, counts_R: torch.Tensor, num_key_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per distinct key (the first `num_key_cols` columns), the row index of its modal set and the key's total count.

    `keys_RC` must be lexicographically sorted and unique (as `torch.unique(dim=0)` returns them),
    so within a key the first row with the maximum count holds the smallest modal set.
    Returns (modal_row_G, total_count_G) for the G distinct keys in sorted order.
    """
    _, group_R = torch.unique(keys_RC[:, :num_key_cols], dim=0, return_inverse=True)
    g = int(group_R.max()) + 1 if group_R.numel() else 0
    max_G = torch.zeros(g, dtype=counts_R.dtype).scatter_reduce(0, group_R, counts_R, "amax", include_self=False)
    total_G = torch.zeros(g, dtype=counts_R.dtype).index_add_(0, group_R, counts_R)
    row_R = torch.arange(keys_RC.shape[0])
    cand_R = torch.where(counts_R == max_G[group_R], row_R, torch.full_like(row_R, keys_RC.shape[0]))
    first_G = torch.full((g,), keys_RC.shape[0], dtype=torch.long).scatter_reduce(0, group_R, cand_R, "amin")
    return first_G, total_G


def _unique_counts(rows_RC: torch.Tensor, counts_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, inv = torch.unique(rows_RC, dim=0, return_inverse=True)
    c = torch.zeros(u.shape[0], dtype=torch.long).index_add_(0, inv, counts_R)
    return u, c


@dataclass
class ModalTables:
    vocab_size: int
    top_k: int
    token_sets_VK: torch.Tensor  # long, -1 where the token was not seen in calibration
    token_counts_V: torch.Tensor  # calibration occurrences per token
    pair_keys_P: torch.Tensor  # sorted prev * V + token
    pair_sets_PK: torch.Tensor
    global_set_K: torch.Tensor

    def token_predict(self, ids_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sets_TK, hit_T): the token's modal set, or the global set when the token is unknown."""
        inside = (ids_T >= 0) & (ids_T < self.vocab_size)
        sets = self.token_sets_VK[ids_T.clamp(0, self.vocab_size - 1)]
        hit = inside & (sets[:, 0] >= 0)
        return torch.where(hit[:, None], sets, self.global_set_K.expand_as(sets)), hit

    def pair_predict(self, prev_T: torch.Tensor, ids_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sets_TK, hit_T): the pair's modal set, else the token table's prediction."""
        fallback, _ = self.token_predict(ids_T)
        if self.pair_keys_P.numel() == 0:
            return fallback, torch.zeros_like(ids_T, dtype=torch.bool)
        key_T = prev_T * self.vocab_size + ids_T
        pos_T = torch.searchsorted(self.pair_keys_P, key_T).clamp_max(self.pair_keys_P.numel() - 1)
        hit = (prev_T >= 0) & (self.pair_keys_P[pos_T] == key_T)
        return torch.where(hit[:, None], self.pair_sets_PK[pos_T], fallback), hit


class SetCounter:
    """Counts (prev, token, top-k set) rows of one layer; prev = -1 at a sequence start."""

    def __init__(self, vocab_size: int, top_k: int):
        self.vocab_size = vocab_size
        self.top_k = top_k
        self._rows: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []
        self._pending = 0
        self.num_tokens = 0

    def add(self, prev_T: torch.Tensor, ids_T: torch.Tensor, topk_idx_TK: torch.Tensor) -> None:
        sets_TK = torch.sort(topk_idx_TK.long(), dim=1).values
        rows = torch.cat([prev_T.long()[:, None], ids_T.long()[:, None], sets_TK], dim=1).cpu()
        u, c = torch.unique(rows, dim=0, return_counts=True)
        self._rows.append(u)
        self._counts.append(c)
        self._pending += u.shape[0]
        self.num_tokens += int(ids_T.numel())
        if self._pending > _CONSOLIDATE_ROWS:
            self._consolidate()

    def _consolidate(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._rows:
            return torch.zeros((0, 2 + self.top_k), dtype=torch.long), torch.zeros(0, dtype=torch.long)
        u, c = _unique_counts(torch.cat(self._rows), torch.cat(self._counts))
        self._rows, self._counts, self._pending = [u], [c], u.shape[0]
        return u, c

    def finalize(self, min_pair_count: int = 1) -> ModalTables:
        rows, counts = self._consolidate()
        if rows.shape[0] == 0:
            raise InvalidInputError("no calibration tokens were seen: cannot build prediction tables (check --split / --num-samples)")
        k, v = self.top_k, self.vocab_size
        # pair table: rows are already (prev, token, set) sorted
        has_prev = rows[:, 0] >= 0
        p_rows, p_counts = rows[has_prev], counts[has_prev]
        if p_rows.shape[0]:
            first, total = modal_rows(p_rows, p_counts, 2)
            keep = total >= min_pair_count
            modal = p_rows[first[keep]]
            pair_keys, pair_sets = modal[:, 0] * v + modal[:, 1], modal[:, 2:]
        else:
            pair_keys, pair_sets = torch.zeros(0, dtype=torch.long), torch.zeros((0, k), dtype=torch.long)
        # token table: sum over prev
        t_rows, t_counts = _unique_counts(rows[:, 1:], counts)
        first, total = modal_rows(t_rows, t_counts, 1)
        modal = t_rows[first]
        token_sets = torch.full((v, k), -1, dtype=torch.long)
        token_counts = torch.zeros(v, dtype=torch.long)
        inside = (modal[:, 0] >= 0) & (modal[:, 0] < v)
        token_sets[modal[inside, 0]] = modal[inside, 1:]
        token_counts[modal[inside, 0]] = total[inside]
        # global set: sum over tokens
        s_rows, s_counts = _unique_counts(rows[:, 2:], counts)
        global_set = s_rows[int(torch.argmax(s_counts))]  # argmax returns the first maximum = smallest set
        return ModalTables(v, k, token_sets, token_counts, pair_keys, pair_sets, global_set)
