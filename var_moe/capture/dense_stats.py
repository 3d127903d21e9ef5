"""DenseTokenStats: the dense (layer x vocabulary x expert) form of the per-token routing statistics.

The reference the sparse `StreamingTokenStats` is tested and benchmarked against: the same
update and merge arithmetic over dense `(L, V)` / `(L, V, E)` / `(L, V, S)` tensors (24 bytes per
(layer, token, expert) cell, so only small shapes fit: 22 GB at Qwen3-30B-A3B's shape). Capture
does not use it. Exact top-k set counts (`set_LVS`) exist when C(E, k) <= `max_sets`.

Shapes: T rows, E experts, K top-k, L layer slots, V vocabulary, S top-k sets, U unique ids.
Test: `pytest tests/test_capture_sparse.py`; benchmark: `python -m benchmarks.capture_memory`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import InvalidInputError, UnknownLayerError
from .streaming_stats import (MAX_SETS, _WELFORD, StreamingTokenStats, binomial_table, chan_combine, encode_sets,
                              ranked_choices,
                              top2_probabilities)


class DenseTokenStats:
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
    def _check_compatible(self, other: "DenseTokenStats") -> None:
        mine = (self.layer_ids, self.vocab_size, self.num_experts, self.top_k, self.exact_sets)
        theirs = (other.layer_ids, other.vocab_size, other.num_experts, other.top_k, other.exact_sets)
        if mine != theirs:
            raise InvalidInputError(f"cannot merge statistics of different shapes: (layers, V, E, k, exact_sets) {mine} vs {theirs}")

    def merge(self, other: "DenseTokenStats") -> "DenseTokenStats":
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


def densify(stats: StreamingTokenStats) -> dict[str, torch.Tensor]:
    """The dense tensors (`DenseTokenStats` names, without `set_LVS`) of sparse statistics."""
    L, V, E = stats.num_layers, stats.vocab_size, stats.num_experts
    st = stats.state_dict()
    nt = st["token_R"].numel()
    out: dict[str, torch.Tensor] = {}
    # statistic row r = token_row * L + slot  ->  dense index slot * V + token
    dense_R = (torch.arange(L)[None, :] * V + st["token_R"][:, None]).reshape(-1) if nt else torch.zeros(0, dtype=torch.long)
    for name, dtype in (("count", torch.long), ("mean_entropy", torch.float64), ("m2_entropy", torch.float64),
                        ("mean_confidence", torch.float64), ("m2_confidence", torch.float64), ("sum_margin", torch.float64)):
        out[f"{name}_LV"] = torch.zeros(L * V, dtype=dtype).index_copy_(0, dense_R, st[f"row_{name}"]).view(L, V)
    keys = st["cell_keys"]
    cell_dense = dense_R[keys // E] * E + keys % E if keys.numel() else keys
    for name, dense_name, dtype in (("top1", "top1_LVE", torch.long), ("topk", "topk_LVE", torch.long),
                                    ("topk_w", "topk_w_LVE", torch.float64)):
        out[dense_name] = torch.zeros(L * V * E, dtype=dtype).index_copy_(0, cell_dense, st[f"cell_{name}"]).view(L, V, E)
    for name in ("pairs_L", "same_top1_L", "in_top2_L", "share_top2_L"):
        out[name] = st[name]
    return out


def set_counts(stats: StreamingTokenStats) -> dict[tuple[int, int, int], int]:
    """{(slot, token id, combinatorial set id): count} of the sparse statistics' set table."""
    st = stats.state_dict()
    L = stats.num_layers
    row, sets = stats._split_set_keys(stats.sets.keys)
    tok, slot = st["token_R"][row // L], row % L
    return {(int(s), int(t), int(x)): int(c) for s, t, x, c in zip(slot, tok, sets, st["set_count"])}
