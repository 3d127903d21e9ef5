"""StreamingTokenStats: per-(layer, token id) routing statistics in O(L x V x E) memory.

Every router call adds its (valid, non-padding) rows with vectorized tensor operations on the
model's device; nothing grows with the number of tokens. Held per MoE layer slot l and token v:

- `count_LV`                        occurrences,
- `mean_*_LV`, `m2_*_LV`            Welford mean and sum of squared deviations of the router
                                    entropy (nats) and of the top-1 probability (confidence),
- `sum_margin_LV`                   sum of (top-1 minus top-2 probability),
- `top1_LVE`, `topk_LVE`            how often expert e was the first choice / among the top-k,
- `topk_w_LVE`                      sum of the routing weight e received when chosen,
- `set_LVS`                         exact counts of each top-k *set* (sorted experts encoded as an
                                    integer with the combinatorial number system) when C(E, k) is
                                    at most `max_sets`; otherwise None (modal set = top-k of
                                    `topk_LVE`, `modal_set_count` not exact and written as null),
- `pairs_L`, `same_top1_L`, `in_top2_L`, `share_top2_L`  consecutive-token counts for the Mixtral
                                    paper's Table 5: pairs, same first choice, first choice in the
                                    previous token's top-2, top-2 sets sharing any expert.

A forward updates the Welford state with Chan's formula: the batch's per-token mean and M2 are
computed with `index_add_` over the unique ids, then combined with the running state. All layers
of one forward see the same tokens, so `update_layers` folds them in with one set of tensor ops
(flat indices slot * V + id); `update` is the one-layer form. `merge`
uses the same formula, so shards merge exactly (counts bit-exact, floats to rounding).

"First choice" is the chosen expert with the largest routing weight (what the experts actually
received); "top-2" are the two chosen experts with the largest weights (the router's two most
probable experts when k = 1). Confidence and margin come from the float32 probabilities.

Shapes: T rows, E experts, K top-k, L layer slots, V vocabulary, S top-k sets, U unique ids.
Test: `pytest tests/test_capture_stats.py`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import torch

from ..errors import InvalidInputError, UnknownLayerError

MAX_SETS = 128  # exact top-k set counts when C(E, k) <= this (dense (L, V, S) int64 counts)
_WELFORD = ("entropy", "confidence")


def binomial_table(n: int, k: int) -> torch.Tensor:
    """binom[a, b] = C(a, b) for a <= n, b <= k (int64)."""
    t = torch.zeros(n + 1, k + 1, dtype=torch.long)
    for a in range(n + 1):
        for b in range(min(a, k) + 1):
            t[a, b] = math.comb(a, b)
    return t


def encode_sets(idx_TK: torch.Tensor, binom: torch.Tensor) -> torch.Tensor:
    """Combinatorial number system id of each row's sorted expert set: sum_i C(c_i, i+1)."""
    c_TK = idx_TK.sort(dim=1).values.long()
    rank_K = torch.arange(1, c_TK.shape[1] + 1, device=c_TK.device)
    return binom[c_TK, rank_K.expand_as(c_TK)].sum(dim=1)


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


class StreamingTokenStats:
    """Streaming per-(layer, token) router statistics; see the module docstring."""

    def __init__(
        self,
        num_layers: int,
        vocab_size: int,
        num_experts: int,
        top_k: int,
        device: str | torch.device = "cpu",
        layer_ids: Sequence[int] | None = None,
        max_sets: int = MAX_SETS,
    ):
        for name, value in (("num_layers", num_layers), ("vocab_size", vocab_size), ("num_experts", num_experts)):
            if value < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {value}")
        if not 1 <= top_k <= num_experts:
            raise InvalidInputError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_layers, self.vocab_size, self.num_experts, self.top_k = num_layers, vocab_size, num_experts, top_k
        self.layer_ids = list(layer_ids) if layer_ids is not None else list(range(num_layers))
        if len(self.layer_ids) != num_layers:
            raise InvalidInputError(f"layer_ids has {len(self.layer_ids)} entries for num_layers={num_layers}")
        self.device = torch.device(device)
        self.num_sets = math.comb(num_experts, top_k)
        self.exact_sets = self.num_sets <= max_sets
        self._binom = binomial_table(num_experts, top_k).to(self.device)
        L, V, E = num_layers, vocab_size, num_experts
        z64 = dict(dtype=torch.float64, device=self.device)
        zi = dict(dtype=torch.long, device=self.device)
        self.tensors: dict[str, torch.Tensor] = {
            "count_LV": torch.zeros(L, V, **zi),
            "mean_entropy_LV": torch.zeros(L, V, **z64),
            "m2_entropy_LV": torch.zeros(L, V, **z64),
            "mean_confidence_LV": torch.zeros(L, V, **z64),
            "m2_confidence_LV": torch.zeros(L, V, **z64),
            "sum_margin_LV": torch.zeros(L, V, **z64),
            "top1_LVE": torch.zeros(L, V, E, **zi),
            "topk_LVE": torch.zeros(L, V, E, **zi),
            "topk_w_LVE": torch.zeros(L, V, E, **z64),
            "pairs_L": torch.zeros(L, **zi),
            "same_top1_L": torch.zeros(L, **zi),
            "in_top2_L": torch.zeros(L, **zi),
            "share_top2_L": torch.zeros(L, **zi),
        }
        if self.exact_sets:
            self.tensors["set_LVS"] = torch.zeros(L, V, self.num_sets, **zi)

    # -- updates -------------------------------------------------------------------------------
    def slot(self, layer: int) -> int:
        try:
            return self.layer_ids.index(layer)
        except ValueError:
            raise UnknownLayerError(f"layer {layer} is not tracked; tracked layers are {self.layer_ids}") from None

    def update(
        self,
        slot: int,
        ids_T: torch.Tensor,
        probs_TE: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_w_TK: torch.Tensor,
        choices_T2: torch.Tensor | None = None,
    ) -> None:
        """Add T already-filtered (valid) rows of one layer slot."""
        self.update_layers(
            [slot], ids_T, probs_TE[None], topk_idx_TK[None], topk_w_TK[None],
            None if choices_T2 is None else choices_T2[None],
        )

    def update_layers(
        self,
        slots: Sequence[int],
        ids_T: torch.Tensor,
        probs_LTE: torch.Tensor,
        topk_idx_LTK: torch.Tensor,
        topk_w_LTK: torch.Tensor,
        choices_LT2: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Add the same T valid tokens as routed by several layer slots, in one set of tensor ops.

        All layers of a forward see the same tokens, so the unique ids, the per-token batch moments
        and every scatter run once over (layers x tokens) with flat indices slot * V + id.
        Returns the (L, T) top-k set ids when sets are counted (reused by the pair table).
        """
        if ids_T.numel() == 0:
            return None
        t = self.tensors
        dev, V, E = self.device, self.vocab_size, self.num_experts
        Lb, T = probs_LTE.shape[0], ids_T.shape[0]
        slot_L = torch.as_tensor(list(slots), dtype=torch.long, device=dev)
        ids_T = ids_T.to(dev).long()  # out-of-range ids fail in index_add_ (no device sync here)
        probs_LTE = probs_LTE.to(dev).float()
        idx_LTK = topk_idx_LTK.to(dev).long()
        w_LTK = topk_w_LTK.to(dev).double()
        if choices_LT2 is None:
            choices_LT2 = ranked_choices(probs_LTE.reshape(Lb * T, E), idx_LTK.reshape(Lb * T, -1),
                                         w_LTK.reshape(Lb * T, -1)).reshape(Lb, T, 2)
        # entropy in nats; the clamp makes 0 log 0 = 0 (no NaN), p < 1e-30 contributes < 1e-28
        entropy_LT = -(probs_LTE * probs_LTE.clamp_min(1e-30).log()).sum(dim=2).double()
        p1_LT, p2_LT = top2_probabilities(probs_LTE)
        conf_LT = p1_LT.double()
        margin_LT = conf_LT - p2_LT.double()

        # Welford: per (layer, unique id) batch mean and M2, then Chan's combination with the state
        uniq_U, inv_T = torch.unique(ids_T, return_inverse=True)
        U = uniq_U.numel()
        row_LT = (torch.arange(Lb, device=dev)[:, None] * U + inv_T[None, :]).reshape(-1)  # into (L*U)
        state_LU = (slot_L[:, None] * V + uniq_U[None, :]).reshape(-1)  # into the flat (L*V) state
        n_b = torch.bincount(inv_T, minlength=U).double().repeat(Lb)[:, None]
        n_a = t["count_LV"].view(-1).index_select(0, state_LU).double()[:, None]
        x_R2 = torch.stack([entropy_LT.reshape(-1), conf_LT.reshape(-1)], dim=1)  # col 0 entropy, col 1 confidence
        mean_b = x_R2.new_zeros(Lb * U, 2).index_add_(0, row_LT, x_R2) / n_b
        m2_b = x_R2.new_zeros(Lb * U, 2).index_add_(0, row_LT, (x_R2 - mean_b.index_select(0, row_LT)) ** 2)
        names = [(f"mean_{n}_LV", f"m2_{n}_LV") for n in _WELFORD]
        mean_a = torch.stack([t[m].view(-1).index_select(0, state_LU) for m, _ in names], dim=1)
        m2_a = torch.stack([t[m2].view(-1).index_select(0, state_LU) for _, m2 in names], dim=1)
        mean, m2 = chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
        for j, (m, m2_name) in enumerate(names):
            t[m].view(-1).index_copy_(0, state_LU, mean[:, j].contiguous())
            t[m2_name].view(-1).index_copy_(0, state_LU, m2[:, j].contiguous())

        flat_LT = slot_L[:, None] * V + ids_T[None, :]  # (L, T) into the flat (L*V) state
        ones = torch.ones(Lb * T * max(idx_LTK.shape[2], 1), dtype=torch.long, device=dev)
        t["count_LV"].view(-1).index_add_(0, flat_LT.reshape(-1), ones[: Lb * T])
        t["sum_margin_LV"].view(-1).index_add_(0, flat_LT.reshape(-1), margin_LT.reshape(-1))
        flat_LTK = (flat_LT[..., None] * E + idx_LTK).reshape(-1)
        t["topk_LVE"].view(-1).index_add_(0, flat_LTK, ones[: flat_LTK.numel()])
        t["topk_w_LVE"].view(-1).index_add_(0, flat_LTK, w_LTK.reshape(-1))
        top1 = (flat_LT * E + choices_LT2[..., 0].to(dev)).reshape(-1)
        t["top1_LVE"].view(-1).index_add_(0, top1, ones[: Lb * T])
        if not self.exact_sets:
            return None
        set_LT = encode_sets(idx_LTK.reshape(Lb * T, -1), self._binom).reshape(Lb, T)
        t["set_LVS"].view(-1).index_add_(0, (flat_LT * self.num_sets + set_LT).reshape(-1), ones[: Lb * T])
        return set_LT

    def update_consecutive_layers(self, slots: Sequence[int], choices_LT2: torch.Tensor, prev_LT2: torch.Tensor) -> None:
        """Consecutive-pair counts of several slots; rows with prev (-1, -1) have no previous token."""
        slot_L = torch.as_tensor(list(slots), dtype=torch.long, device=self.device)
        cur, prev = choices_LT2.to(self.device), prev_LT2.to(self.device)
        has_LT = prev[..., 0] >= 0
        same = (cur[..., 0] == prev[..., 0]) & has_LT
        in2 = (cur[..., :1] == prev).any(dim=2) & has_LT
        share = (cur[..., :, None] == prev[..., None, :]).any(dim=3).any(dim=2) & has_LT
        for key, hit_LT in (("pairs_L", has_LT), ("same_top1_L", same), ("in_top2_L", in2), ("share_top2_L", share)):
            self.tensors[key].index_add_(0, slot_L, hit_LT.sum(dim=1))

    # -- merge / state ------------------------------------------------------------------------
    def _check_compatible(self, other: "StreamingTokenStats") -> None:
        mine = (self.layer_ids, self.vocab_size, self.num_experts, self.top_k, self.exact_sets)
        theirs = (other.layer_ids, other.vocab_size, other.num_experts, other.top_k, other.exact_sets)
        if mine != theirs:
            raise InvalidInputError(f"cannot merge statistics of different shapes: (layers, V, E, k, exact_sets) {mine} vs {theirs}")

    def merge(self, other: "StreamingTokenStats") -> "StreamingTokenStats":
        """Add another shard's statistics in place (Chan's parallel algorithm); returns self."""
        self._check_compatible(other)
        a, b = self.tensors, {k: v.to(self.device) for k, v in other.tensors.items()}
        n_a, n_b = a["count_LV"].double(), b["count_LV"].double()
        for name in _WELFORD:
            mean, m2 = chan_combine(n_a, a[f"mean_{name}_LV"], a[f"m2_{name}_LV"], n_b, b[f"mean_{name}_LV"], b[f"m2_{name}_LV"])
            a[f"mean_{name}_LV"], a[f"m2_{name}_LV"] = mean, m2
        for key in a:
            if not key.startswith(("mean_", "m2_")):
                a[key] += b[key]
        return self

    def all_reduce_(self, group: Any = None) -> "StreamingTokenStats":
        """Exact data-parallel reduction with torch.distributed (sums; two-pass parallel M2)."""
        import torch.distributed as dist

        t = self.tensors
        n_local = t["count_LV"].double()
        for key in t:
            if not key.startswith(("mean_", "m2_")):
                dist.all_reduce(t[key], group=group)
        n = t["count_LV"].double()
        for name in _WELFORD:
            mean_local = t[f"mean_{name}_LV"].clone()
            total = mean_local * n_local
            dist.all_reduce(total, group=group)
            mean = total / n.clamp_min(1.0)
            # M2 = sum_r [M2_r + n_r (mean_r - mean)^2]: the N-way form of Chan's combination
            m2 = t[f"m2_{name}_LV"] + n_local * (mean_local - mean) ** 2
            dist.all_reduce(m2, group=group)
            t[f"mean_{name}_LV"], t[f"m2_{name}_LV"] = mean, m2
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.tensors) - set(state)
        if missing:
            raise InvalidInputError(f"statistics state is missing {sorted(missing)}")
        for k, v in self.tensors.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise InvalidInputError(f"statistics state {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
            v.copy_(state[k].to(self.device))

    def reset(self) -> None:
        for v in self.tensors.values():
            v.zero_()

    def describe(self) -> dict[str, Any]:
        return {
            "layers": self.layer_ids,
            "vocab_size": self.vocab_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "exact_sets": self.exact_sets,
        }

    @property
    def num_tokens(self) -> int:
        """Valid tokens seen (per layer; the first layer's count)."""
        return int(self.tensors["count_LV"][0].sum())

    def consecutive_rates(self) -> dict[str, dict[str, float | int]]:
        """Per layer: pairs counted, share with the same first choice, share with first in previous top-2."""
        t = {k: self.tensors[k].cpu() for k in ("pairs_L", "same_top1_L", "in_top2_L", "share_top2_L")}
        out = {}
        for slot, layer in enumerate(self.layer_ids):
            n = int(t["pairs_L"][slot])
            out[str(layer)] = {
                "pairs": n,
                "same_top1": int(t["same_top1_L"][slot]),
                "in_top2": int(t["in_top2_L"][slot]),
                "share_top2": int(t["share_top2_L"][slot]),
                "same_top1_rate": int(t["same_top1_L"][slot]) / n if n else float("nan"),
                "top1_in_prev_top2_rate": int(t["in_top2_L"][slot]) / n if n else float("nan"),
                "top2_sets_intersect_rate": int(t["share_top2_L"][slot]) / n if n else float("nan"),
            }
        return out
