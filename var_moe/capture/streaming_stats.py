"""StreamingTokenStats: per-(layer, token id) routing statistics in memory proportional to what was seen.

Every router call adds its (valid, non-padding) rows with vectorized tensor operations on the
model's device. Nothing is allocated per vocabulary entry or per expert that was not observed:

- token rows: a token gets a row number the first time it is seen (`row_of_V`, 8 bytes per
  vocabulary entry, the only vocabulary-sized array); statistic row `r = token_row * L + slot`;
- per (layer, token) row (48 bytes): `count` occurrences, Welford `mean_*` / `m2_*` of the router
  entropy (nats) and of the top-1 probability (confidence), `sum_margin` (top-1 minus top-2);
- per observed (layer, token, expert) cell (24 bytes + the index): `top1` how often e was the
  first choice, `topk` how often among the top-k, `topk_w` the summed routing weight it received.
  Cells live in a `HashIndex` keyed by `r * E + e`;
- per observed (layer, token, top-k set): counts by lossy counting (Manku & Motwani, with the
  adaptive floor of `pairs.py`): a set's id is its combinatorial-number-system code; key
  `r * S + id` where that fits int64, else the id is mapped to a dense number by a dictionary of
  sets seen and the key is `r * 2**31 + number` (C(384, 8) * V * L does not fit). Past `set_capacity`
  entries the smallest `count + delta` are dropped to half; `set_err` (the largest dropped bound)
  is the most any absent set's count can be; a set entered later has delta = set_err. With
  `set_err == 0` every set count is exact;
- `pairs_L`, `same_top1_L`, `in_top2_L`, `share_top2_L`: consecutive-token counts (the Mixtral
  paper's Table 5): pairs, same first choice, first choice in the previous token's top-2, top-2
  sets sharing any expert.

Welford updates use Chan's formula: per (layer, unique id) batch mean and M2 by `index_add_`,
then combined with the running state; `merge` (shards) and `all_reduce_` (data parallel: every
rank's state gathered and merged in rank order) use the same formula, so counts are bit-exact and
floats equal one pass to rounding. `var_moe.capture.dense_stats.DenseTokenStats` holds the dense
(L x V x E) form these equal where it fits (tests, benchmark).

"First choice" is the chosen expert with the largest routing weight (what the experts actually
received); "top-2" are the two chosen experts with the largest weights (the router's two most
probable experts when k = 1). Confidence and margin come from the float32 probabilities.

Shapes: T rows, E experts, K top-k, L layer slots, V vocabulary, S top-k sets, U unique ids,
R statistic rows, C cells. Test: `pytest tests/test_capture_stats.py tests/test_capture_sparse.py`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import InvalidInputError, UnknownLayerError
from .hash_index import HashIndex
from .router_math import (binomial_table, chan_combine, decode_set_ids, decode_table, encode_sets,  # noqa: F401
                          previous_rows, ranked_choices, top2_probabilities)

MAX_SETS = 128  # pair statistics key exact sets when C(E, k) <= this
DEFAULT_SET_CAPACITY = 4_000_000  # (layer, token, set) entries kept before lossy pruning
_SET_BITS = 31  # set numbers per statistic row in a set key
_WELFORD = ("entropy", "confidence")


def _grown(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` with room for at least n entries along dim 0 (doubling; new entries zero)."""
    if n <= t.shape[0]:
        return t
    out = t.new_zeros((max(n, 2 * t.shape[0], 16), *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


ROW_STATS = ("count", "mean_entropy", "m2_entropy", "mean_confidence", "m2_confidence", "sum_margin")
CELL_STATS = ("top1", "topk", "topk_w")
CONSECUTIVE = ("pairs_L", "same_top1_L", "in_top2_L", "share_top2_L")


class StreamingTokenStats:
    """Streaming per-(layer, token) router statistics, stored sparsely; see the module docstring."""

    def __init__(
        self,
        num_layers: int,
        vocab_size: int,
        num_experts: int,
        top_k: int,
        device: str | torch.device = "cpu",
        layer_ids: Sequence[int] | None = None,
        set_capacity: int = DEFAULT_SET_CAPACITY,
    ):
        for name, value in (("num_layers", num_layers), ("vocab_size", vocab_size), ("num_experts", num_experts)):
            if value < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {value}")
        if not 1 <= top_k <= num_experts:
            raise InvalidInputError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if set_capacity < 2:
            raise InvalidInputError(f"set_capacity must be >= 2, got {set_capacity}")
        self.num_layers, self.vocab_size, self.num_experts, self.top_k = num_layers, vocab_size, num_experts, top_k
        self.layer_ids = list(layer_ids) if layer_ids is not None else list(range(num_layers))
        if len(self.layer_ids) != num_layers:
            raise InvalidInputError(f"layer_ids has {len(self.layer_ids)} entries for num_layers={num_layers}")
        self.num_sets = math.comb(num_experts, top_k)
        if self.num_sets >= 2**62 or vocab_size * num_layers >= 2 ** (63 - _SET_BITS):
            raise InvalidInputError(f"C({num_experts}, {top_k}) sets or {vocab_size} x {num_layers} rows do not fit int64 keys")
        self.set_capacity = set_capacity
        # sets keyed row * S + id directly when that fits int64, else through a dictionary of sets seen
        self.direct_sets = vocab_size * num_layers * self.num_sets < 2**62
        self.device = torch.device(device)
        self._binom = binomial_table(num_experts, top_k).to(self.device)
        self.reset()

    def reset(self) -> None:
        dev, L = self.device, self.num_layers
        self.row_of_V = torch.full((self.vocab_size,), -1, dtype=torch.long, device=dev)
        self.token_R = torch.zeros(0, dtype=torch.long, device=dev)  # token id of each token row
        self.num_token_rows = 0
        self.rows = {n: torch.zeros(0, dtype=torch.long if n == "count" else torch.float64, device=dev) for n in ROW_STATS}
        self.cells = HashIndex(dev)
        self.cell = {n: torch.zeros(0, dtype=torch.float64 if n == "topk_w" else torch.long, device=dev) for n in CELL_STATS}
        self.set_dict = HashIndex(dev)  # combinatorial set id -> set number
        self.sets = HashIndex(dev)  # row * 2**31 + set number -> entry
        self.set_count = torch.zeros(0, dtype=torch.long, device=dev)
        self.set_delta = torch.zeros(0, dtype=torch.long, device=dev)
        self.set_err = 0
        self.consecutive = {n: torch.zeros(L, dtype=torch.long, device=dev) for n in CONSECUTIVE}

    # -- growing storage ---------------------------------------------------------------------
    def _token_rows(self, ids_U: torch.Tensor) -> torch.Tensor:
        """Token row of each (distinct) id, giving new ids the next rows."""
        tr_U = self.row_of_V.index_select(0, ids_U)
        new = tr_U < 0
        if bool(new.any()):
            fresh = ids_U[new]
            n0, n1 = self.num_token_rows, self.num_token_rows + fresh.numel()
            self.row_of_V.index_copy_(0, fresh, torch.arange(n0, n1, device=self.device))
            self.token_R = _grown(self.token_R, n1)
            self.token_R[n0:n1] = fresh
            self.num_token_rows = n1
            for n, t in self.rows.items():
                self.rows[n] = _grown(t, n1 * self.num_layers)
            tr_U = self.row_of_V.index_select(0, ids_U)
        return tr_U

    def _cell_entries(self, key_C: torch.Tensor) -> torch.Tensor:
        idx = self.cells.insert(key_C)
        for n, t in self.cell.items():
            self.cell[n] = _grown(t, len(self.cells))
        return idx

    def _set_key(self, row_N: torch.Tensor, set_N: torch.Tensor) -> torch.Tensor:
        """Key of (statistic row, set id): row * S + id when that fits int64, else via the set dictionary."""
        if self.direct_sets:
            return row_N * self.num_sets + set_N
        return row_N * (1 << _SET_BITS) + self.set_dict.insert(set_N)

    def _split_set_keys(self, key_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(statistic row, combinatorial set id) of set keys."""
        if self.direct_sets:
            return key_N // self.num_sets, key_N % self.num_sets
        return key_N >> _SET_BITS, self.set_dict.keys.index_select(0, key_N & ((1 << _SET_BITS) - 1))

    def _set_entries(self, row_N: torch.Tensor, set_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(entry, is_new) of each (row, set id); new entries start at count 0, delta = set_err."""
        key = self._set_key(row_N, set_N)
        n_before = len(self.sets)
        idx = self.sets.insert(key)
        if len(self.sets) > n_before:
            self.set_count = _grown(self.set_count, len(self.sets))
            self.set_delta = _grown(self.set_delta, len(self.sets))
            self.set_delta[n_before: len(self.sets)] = self.set_err
        return idx, idx >= n_before

    def _prune_sets(self) -> None:
        """Lossy counting: past capacity keep the largest count + delta, down to capacity / 2."""
        n = len(self.sets)
        if n <= self.set_capacity:
            return
        count, delta = self.set_count[:n], self.set_delta[:n]
        bound = count + delta
        floor = int(bound.kthvalue(n - self.set_capacity // 2).values)
        keep = bound > floor
        self.set_err = max(self.set_err, floor)
        keys = self.sets.keys[keep]
        if not self.direct_sets:  # renumber the sets still referenced
            row, num = keys >> _SET_BITS, keys & ((1 << _SET_BITS) - 1)
            used, inv = torch.unique(num, return_inverse=True)
            self.set_dict = HashIndex.build(self.set_dict.keys.index_select(0, used), self.device)
            keys = row * (1 << _SET_BITS) + inv
        self.sets = HashIndex.build(keys, self.device)
        self.set_count, self.set_delta = count[keep].clone(), delta[keep].clone()

    # -- updates -------------------------------------------------------------------------------
    def slot(self, layer: int) -> int:
        try:
            return self.layer_ids.index(layer)
        except ValueError:
            raise UnknownLayerError(f"layer {layer} is not tracked; tracked layers are {self.layer_ids}") from None

    def update(self, slot: int, ids_T: torch.Tensor, probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor,
               topk_w_TK: torch.Tensor, choices_T2: torch.Tensor | None = None) -> None:
        """Add T already-filtered (valid) rows of one layer slot."""
        self.update_layers([slot], ids_T, probs_TE[None], topk_idx_TK[None], topk_w_TK[None],
                           None if choices_T2 is None else choices_T2[None])

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
        and every scatter run once over (layers x tokens). Returns the (L, T) top-k set ids.
        """
        if ids_T.numel() == 0:
            return None
        dev, L, E = self.device, self.num_layers, self.num_experts
        Lb, T = probs_LTE.shape[0], ids_T.shape[0]
        slot_L = torch.as_tensor(list(slots), dtype=torch.long, device=dev)
        ids_T = ids_T.to(dev).long()
        if bool((ids_T < 0).any() | (ids_T >= self.vocab_size).any()):
            raise InvalidInputError(f"token ids must lie in [0, vocab_size={self.vocab_size})")
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
        tr_U = self._token_rows(uniq_U)
        r = self.rows
        row_LT_local = (torch.arange(Lb, device=dev)[:, None] * U + inv_T[None, :]).reshape(-1)  # into (L*U)
        state_LU = (tr_U[None, :] * L + slot_L[:, None]).reshape(-1)  # statistic rows
        n_b = torch.bincount(inv_T, minlength=U).double().repeat(Lb)[:, None]
        n_a = r["count"].index_select(0, state_LU).double()[:, None]
        x_R2 = torch.stack([entropy_LT.reshape(-1), conf_LT.reshape(-1)], dim=1)  # col 0 entropy, col 1 confidence
        mean_b = x_R2.new_zeros(Lb * U, 2).index_add_(0, row_LT_local, x_R2) / n_b
        m2_b = x_R2.new_zeros(Lb * U, 2).index_add_(0, row_LT_local, (x_R2 - mean_b.index_select(0, row_LT_local)) ** 2)
        names = [(f"mean_{n}", f"m2_{n}") for n in _WELFORD]
        mean_a = torch.stack([r[m].index_select(0, state_LU) for m, _ in names], dim=1)
        m2_a = torch.stack([r[m2].index_select(0, state_LU) for _, m2 in names], dim=1)
        mean, m2 = chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
        for j, (m, m2_name) in enumerate(names):
            r[m].index_copy_(0, state_LU, mean[:, j].contiguous())
            r[m2_name].index_copy_(0, state_LU, m2[:, j].contiguous())

        row_LT = tr_U.index_select(0, inv_T)[None, :] * L + slot_L[:, None]  # (L, T) statistic rows
        flat = row_LT.reshape(-1)
        K = idx_LTK.shape[2]
        ones = torch.ones(Lb * T * K, dtype=torch.long, device=dev)
        r["count"].index_add_(0, flat, ones[: Lb * T])
        r["sum_margin"].index_add_(0, flat, margin_LT.reshape(-1))
        cell_C = self._cell_entries((row_LT[..., None] * E + idx_LTK).reshape(-1))
        self.cell["topk"].index_add_(0, cell_C, ones)
        self.cell["topk_w"].index_add_(0, cell_C, w_LTK.reshape(-1))
        self.cell["top1"].index_add_(0, cell_C, (idx_LTK == choices_LT2[..., :1].to(dev)).reshape(-1).long())
        set_LT = encode_sets(idx_LTK.reshape(Lb * T, K), self._binom).reshape(Lb, T)
        entry_N, _ = self._set_entries(flat, set_LT.reshape(-1))
        self.set_count.index_add_(0, entry_N, ones[: Lb * T])
        self._prune_sets()
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
            self.consecutive[key].index_add_(0, slot_L, hit_LT.sum(dim=1))

    # -- merge / state ------------------------------------------------------------------------
    def _check_compatible(self, other: "StreamingTokenStats") -> None:
        mine = (self.layer_ids, self.vocab_size, self.num_experts, self.top_k)
        theirs = (other.layer_ids, other.vocab_size, other.num_experts, other.top_k)
        if mine != theirs:
            raise InvalidInputError(f"cannot merge statistics of different shapes: (layers, V, E, k) {mine} vs {theirs}")

    def merge(self, other: "StreamingTokenStats") -> "StreamingTokenStats":
        """Add another shard's statistics in place (Chan's parallel algorithm); returns self."""
        self._check_compatible(other)
        dev, L, E = self.device, self.num_layers, self.num_experts
        nb = other.num_token_rows
        if nb:
            # statistic row of self for every statistic row of other (other's row order)
            tr = self._token_rows(other.token_R[:nb].to(dev))
            rows_b = (tr[:, None] * L + torch.arange(L, device=dev)[None, :]).reshape(-1)
            b = {n: t[: nb * L].to(dev) for n, t in other.rows.items()}
            a = self.rows
            n_a, n_b = a["count"].index_select(0, rows_b).double(), b["count"].double()
            for name in _WELFORD:
                mean, m2 = chan_combine(n_a, a[f"mean_{name}"].index_select(0, rows_b), a[f"m2_{name}"].index_select(0, rows_b),
                                        n_b, b[f"mean_{name}"], b[f"m2_{name}"])
                a[f"mean_{name}"].index_copy_(0, rows_b, mean)
                a[f"m2_{name}"].index_copy_(0, rows_b, m2)
            a["count"].index_add_(0, rows_b, b["count"])
            a["sum_margin"].index_add_(0, rows_b, b["sum_margin"])
            keys = other.cells.keys.to(dev)
            cell_C = self._cell_entries(rows_b.index_select(0, keys // E) * E + keys % E)
            for n in CELL_STATS:
                self.cell[n].index_add_(0, cell_C, other.cell[n][: len(other.cells)].to(dev))
            self._merge_sets(other, rows_b)
        for n in CONSECUTIVE:
            self.consecutive[n] += other.consecutive[n].to(dev)
        return self

    def _merge_sets(self, other: "StreamingTokenStats", rows_b: torch.Tensor) -> None:
        """Lossy-counting merge: a set absent on one side may have been dropped there (its err)."""
        dev, n_a = self.device, len(self.sets)
        keys = other.sets.keys
        row, set_N = (x.to(dev) for x in other._split_set_keys(keys))
        count_b, delta_b = other.set_count[: keys.numel()].to(dev), other.set_delta[: keys.numel()].to(dev)
        err_a, err_b = self.set_err, other.set_err
        self.set_delta[:n_a] += err_b  # every old entry may be low by err_b; shared ones fixed below
        entry, new = self._set_entries(rows_b.index_select(0, row), set_N)
        self.set_count.index_add_(0, entry, count_b)
        # shared: delta_a + delta_b (undo err_b); new: delta_b + err_a (set by _set_entries to err_a)
        self.set_delta.index_add_(0, entry, torch.where(new, delta_b, delta_b - err_b))
        self.set_err = err_a + err_b
        self._prune_sets()

    def state_dict(self) -> dict[str, torch.Tensor]:
        nt, L = self.num_token_rows, self.num_layers
        out = {"token_R": self.token_R[:nt]}
        out |= {f"row_{n}": t[: nt * L] for n, t in self.rows.items()}
        out["cell_keys"] = self.cells.keys
        out |= {f"cell_{n}": t[: len(self.cells)] for n, t in self.cell.items()}
        out |= {"set_dict": self.set_dict.keys, "set_keys": self.sets.keys, "set_count": self.set_count[: len(self.sets)],
                "set_delta": self.set_delta[: len(self.sets)], "set_err": torch.tensor([self.set_err])}
        out |= dict(self.consecutive)
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        want = ["token_R", "cell_keys", "set_dict", "set_keys", "set_count", "set_delta", "set_err",
                *(f"row_{n}" for n in ROW_STATS), *(f"cell_{n}" for n in CELL_STATS), *CONSECUTIVE]
        missing = [k for k in want if k not in state]
        if missing:
            raise InvalidInputError(f"statistics state is missing {sorted(missing)}")
        nt, L = state["token_R"].numel(), self.num_layers
        sizes = {**{f"row_{n}": nt * L for n in ROW_STATS}, **{f"cell_{n}": state["cell_keys"].numel() for n in CELL_STATS},
                 "set_count": state["set_keys"].numel(), "set_delta": state["set_keys"].numel(),
                 **{n: L for n in CONSECUTIVE}}
        for k, n in sizes.items():
            if state[k].numel() != n:
                raise InvalidInputError(f"statistics state {k} has {state[k].numel()} entries, expected {n}")
        dev = self.device
        self.reset()
        token_R = state["token_R"].to(dev).long()
        if nt and bool((token_R < 0).any() | (token_R >= self.vocab_size).any()):
            raise InvalidInputError(f"statistics state names token ids outside the vocabulary of {self.vocab_size}")
        self.token_R, self.num_token_rows = token_R.clone(), nt
        self.row_of_V.index_copy_(0, token_R, torch.arange(nt, device=dev))
        self.rows = {n: state[f"row_{n}"].to(dev).clone() for n in ROW_STATS}
        self.cells = HashIndex.build(state["cell_keys"], dev)
        self.cell = {n: state[f"cell_{n}"].to(dev).clone() for n in CELL_STATS}
        self.set_dict = HashIndex.build(state["set_dict"], dev)
        self.sets = HashIndex.build(state["set_keys"], dev)
        self.set_count, self.set_delta = state["set_count"].to(dev).clone(), state["set_delta"].to(dev).clone()
        self.set_err = int(state["set_err"][0])
        self.consecutive = {n: state[n].to(dev).clone() for n in CONSECUTIVE}

    def all_reduce_(self, group: Any = None) -> "StreamingTokenStats":
        """Exact data-parallel reduction: every rank's state gathered and merged in rank order."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        mine = self.state_dict()
        gathered = {k: gather_variable(v.to(self.device).reshape(-1), world, group) for k, v in mine.items()}
        shards = []
        for rank in range(world):
            shard = StreamingTokenStats(self.num_layers, self.vocab_size, self.num_experts, self.top_k, self.device,
                                        self.layer_ids, self.set_capacity)
            shard.load_state_dict({k: g[rank] for k, g in gathered.items()})
            shards.append(shard)
        merged = shards[0]
        for shard in shards[1:]:
            merged.merge(shard)
        self.load_state_dict(merged.state_dict())
        return self

    def nbytes(self) -> int:
        """Bytes held by the statistics (allocated capacity, index tables included)."""
        tensors = [self.row_of_V, self.token_R, self.set_count, self.set_delta, *self.rows.values(), *self.cell.values()]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(
            h.nbytes() for h in (self.cells, self.set_dict, self.sets))

    def describe(self) -> dict[str, Any]:
        return {
            "layers": self.layer_ids,
            "vocab_size": self.vocab_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "sets": {"method": "lossy counting (Manku & Motwani) with adaptive floor; exact where error_bound is 0",
                     "capacity": self.set_capacity, "error_bound": self.set_err, "entries": len(self.sets)},
        }

    @property
    def num_tokens(self) -> int:
        """Valid tokens seen (per layer; the first layer's count)."""
        nt = self.num_token_rows
        return int(self.rows["count"][: nt * self.num_layers].view(nt, self.num_layers)[:, 0].sum()) if nt else 0

    def consecutive_rates(self) -> dict[str, dict[str, float | int]]:
        """Per layer: pairs counted, share with the same first choice, share with first in previous top-2."""
        t = {k: v.cpu() for k, v in self.consecutive.items()}
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


def gather_variable(t: torch.Tensor, world: int, group: Any = None) -> list[torch.Tensor]:
    """all_gather of 1-D tensors of different lengths (pad to the longest, then trim)."""
    import torch.distributed as dist

    n = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    longest = int(max(int(s) for s in sizes))
    padded = torch.cat([t, t.new_zeros(longest - t.numel())])
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return [o[: int(s)] for o, s in zip(out, sizes)]
