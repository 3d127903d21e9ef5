"""Per-row routing arithmetic shared by the capture statistics: top-k set codes (combinatorial
number system), first/second choices, the top-2 probabilities, previous-row alignment and Chan's
parallel Welford combination. All vectorized over rows (loops run over K or E, never over tokens).

Test: `pytest tests/test_capture_stats.py tests/test_capture_sparse.py`.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from ..errors import InvalidInputError


@functools.lru_cache(maxsize=16)
def binomial_table(n: int, k: int) -> torch.Tensor:
    """binom[a, b] = C(a, b) for a <= n, b <= k (int64; C(384, 8) ~ 1.2e16 fits where 384**8 does not).
    Cached: callers must not write into it."""
    if math.comb(n, k) >= 2**63:
        raise InvalidInputError(f"top-{k} set codes of {n} experts do not fit int64 (C({n}, {k}) >= 2**63)")
    t = torch.zeros(n + 1, k + 1, dtype=torch.long)
    for a in range(n + 1):
        for b in range(min(a, k) + 1):
            t[a, b] = math.comb(a, b)
    return t


def set_codes(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The one integer code of a top-k expert set, used by capture, tables and offload alike: the
    combinatorial number system id of the sorted set (order of the ids within a row does not matter;
    code order is colexicographic, which is what "ties -> the smallest set" means everywhere)."""
    return encode_sets(idx_TK, binomial_table(num_experts, idx_TK.shape[1]).to(idx_TK.device))


def encode_sets(idx_TK: torch.Tensor, binom: torch.Tensor) -> torch.Tensor:
    """Combinatorial number system id of each row's sorted expert set: sum_i C(c_i, i+1)."""
    c_TK = idx_TK.sort(dim=1).values.long()
    rank_K = torch.arange(1, c_TK.shape[1] + 1, device=c_TK.device)
    return binom[c_TK, rank_K.expand_as(c_TK)].sum(dim=1)


def decode_set_ids(set_N: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """(N, K) sorted expert sets of combinatorial ids (greedy: largest c_i with C(c_i, i) <= rest)."""
    binom = binomial_table(num_experts, top_k).to(set_N.device)
    rest = set_N.reshape(-1).long().clone()
    out = torch.empty(set_N.numel(), top_k, dtype=torch.long, device=set_N.device)
    for i in range(top_k, 0, -1):  # a loop over set positions, not rows
        col = binom[:num_experts, i].contiguous()  # non-decreasing in c
        c = torch.searchsorted(col, rest, right=True) - 1
        out[:, i - 1] = c
        rest = rest - col[c]
    return out


def decode_table(num_experts: int, top_k: int) -> torch.Tensor:
    """(S, K) sorted expert sets indexed by their combinatorial id."""
    combos = torch.tensor(list(itertools.combinations(range(num_experts), top_k)), dtype=torch.long)
    ids = encode_sets(combos, binomial_table(num_experts, top_k))
    out = torch.empty_like(combos)
    out[ids] = combos
    return out


def ranked_choices(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor) -> torch.Tensor:
    """(T, 2) first and second choice: chosen experts by weight (by probability when k = 1).

    Ties go to the earlier top-k slot (as a stable descending sort would). A running comparison
    over the K slots (a loop over top-k slots, not tokens): argsort of tiny rows is slow on CPU.
    """
    idx_TK = topk_idx_TK.long()
    if idx_TK.shape[1] == 1:
        second = probs_TE.masked_fill(
            torch.nn.functional.one_hot(idx_TK[:, 0], probs_TE.shape[1]).bool(), -1.0
        ).argmax(dim=1)
        return torch.stack([idx_TK[:, 0], second], dim=1)
    w_TK = topk_w_TK.float()
    w1, i1 = w_TK[:, 0], idx_TK[:, 0]
    w2, i2 = w_TK[:, 1], idx_TK[:, 1]
    swap = w2 > w1
    w1, w2 = torch.where(swap, w2, w1), torch.where(swap, w1, w2)
    i1, i2 = torch.where(swap, i2, i1), torch.where(swap, i1, i2)
    for j in range(2, idx_TK.shape[1]):
        w, i = w_TK[:, j], idx_TK[:, j]
        beats1, beats2 = w > w1, w > w2
        w2 = torch.where(beats1, w1, torch.where(beats2, w, w2))
        i2 = torch.where(beats1, i1, torch.where(beats2, i, i2))
        w1, i1 = torch.where(beats1, w, w1), torch.where(beats1, i, i1)
    return torch.stack([i1, i2], dim=1)


def top2_probabilities(probs_XE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest and second-largest value over the last dim (a running max over the E experts).

    `topk`/`max` with indices over a short last dimension are several times slower on CPU.
    """
    p_EX = probs_XE.movedim(-1, 0).contiguous()
    m1 = p_EX[0].clone()
    m2 = torch.full_like(m1, 0.0 if p_EX.shape[0] == 1 else -1.0)
    for e in range(1, p_EX.shape[0]):
        x = p_EX[e]
        m2 = torch.maximum(m2, torch.minimum(m1, x))
        m1 = torch.maximum(m1, x)
    return m1, m2


def previous_rows(valid_BS: torch.Tensor) -> torch.Tensor:
    """(B*S,) flat index of the previous valid position of the same row, -1 where none."""
    b, s = valid_BS.shape
    pos_BS = torch.arange(s, device=valid_BS.device).expand(b, s)
    last_BS = torch.where(valid_BS, pos_BS, torch.full_like(pos_BS, -1)).cummax(dim=1).values
    prev_BS = torch.cat([last_BS.new_full((b, 1), -1), last_BS[:, :-1]], dim=1)
    row_B1 = torch.arange(b, device=valid_BS.device)[:, None] * s
    return torch.where(prev_BS >= 0, prev_BS + row_B1, prev_BS).reshape(-1)


def chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel Welford combination (float64 tensors, counts as float64)."""
    n = n_a + n_b
    safe = n.clamp_min(1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe)
    return mean, m2
