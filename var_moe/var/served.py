"""The served tables and the one routing decision every consumer makes from them.

`decide`: in layer slot l, a valid in-vocabulary row takes its token's entry where the token is a
member of the layer's table; else its (previous token, token) pair entry where the layer has one
(`pair_serves`: a token entry wins; a row at a sequence start, previous = -1, has no pair); else
nothing, and the learned router decides. `ServedTables` is the one layout every consumer reads
(slots stacked, weights scaled once by `scale_weights` as the family's router scales its own, all
slots' pair entries in one sorted key tensor): the builtin router (var/stack.py), the vLLM loader
(vllm/tables.py), the server's per-request counts (server/vllm_host.py), the offline served masks
(pairs.py) and the offload `var` predictor. `pair_key` / `split_key` are the one codec of pair keys,
`slot * V**2 + previous * V + token`: plain arithmetic, so torch tensors, numpy arrays and host ints
alike (the batch-1 host path and vLLM's host index use them on numpy and ints).

Shapes: L layer slots, T rows, V vocabulary, K top-k, X stacked pair entries.
Test: `pytest tests/test_served_decision.py` (every consumer against `decide`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

TIERS = ("fast", "learned")  # the tiers a routing decision counts in, everywhere


def pair_key(slot: Any, prev: Any, tok: Any, vocab: int) -> Any:
    """The key of a (previous, token) pair entry of layer slot `slot`: slot * V**2 + prev * V + tok
    (ints, numpy arrays or tensors; int64 for arrays: V**2 overflows int32). Slot 0 costs no
    array op beyond prev * V + tok (the per-step host lookups use it)."""
    key = prev * vocab + tok
    return key if isinstance(slot, int) and slot == 0 else key + slot * vocab * vocab


def split_key(key: Any, vocab: int) -> tuple[Any, Any, Any]:
    """(slot, prev, tok) of pair keys: the inverse of `pair_key`."""
    base = key % (vocab * vocab)
    return key // (vocab * vocab), base // vocab, base % vocab


def pair_serves(token_hit: Any, pair_hit: Any) -> Any:
    """The precedence rule: a pair entry serves a row only where the row's token has no token entry
    in that layer (bool tensors or numpy arrays, broadcasting)."""
    return pair_hit & ~token_hit


def scale_weights(w_NK: torch.Tensor, mass_N: torch.Tensor, scale: float | None,
                  output_scale: float = 1.0) -> torch.Tensor:
    """Stored weights (rows sum to 1 over the set) scaled the way the router scales its own: times
    `scale`, the constant the family's top-k weights sum to (`MoEAdapter.weight_scale`: 1 for
    renormalising routers), or, for a router whose weights sum to no constant (`scale` None), times
    the entry's raw mass; then divided by `output_scale`, the factor an engine multiplies the routed
    experts' output by after its router instead of inside it (vLLM's DeepSeek runner applies
    `routed_scaling_factor` there; 1 elsewhere)."""
    w = w_NK.float()
    w = w * mass_N.float()[..., None] if scale is None else w * scale
    return w if output_scale == 1.0 else w / output_scale


def find_pairs(keys_X: torch.Tensor, prev_N: torch.Tensor, tok_N: torch.Tensor, vocab: int,
               slot: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(hit, idx): whether each row's `pair_key(slot, previous, token)` is in the sorted `keys_X`,
    and its index there. Rows whose previous token is not in [0, V) (-1: a sequence start) never
    hit. `slot`: an int, or a tensor of slots broadcasting against the rows. No host sync."""
    has = (prev_N >= 0) & (prev_N < vocab)
    if keys_X.numel() == 0:
        shape = torch.broadcast_shapes(has.shape, torch.as_tensor(slot).shape)
        return torch.zeros(shape, dtype=torch.bool, device=has.device), torch.zeros(shape, dtype=torch.long, device=has.device)
    key_N = pair_key(slot, torch.where(has, prev_N, 0).long(), tok_N.long(), vocab)
    idx = torch.searchsorted(keys_X, key_N).clamp_max(keys_X.numel() - 1)  # in range where absent
    return (keys_X[idx] == key_N) & has, idx


@dataclass
class Decision:
    """One forward's table decision for every layer slot (`decide`)."""

    safe_T: torch.Tensor  # token id, 0 where out of vocabulary
    token_LT: torch.Tensor  # served by a token entry
    pair_LT: torch.Tensor | None  # served by a pair entry (None: no pair lookup ran)
    idx_LTK: torch.Tensor  # the served set where fast (the token's entry elsewhere)
    w_LTK: torch.Tensor  # the served weights where fast

    @property
    def fast_LT(self) -> torch.Tensor:
        return self.token_LT if self.pair_LT is None else self.token_LT | self.pair_LT


@dataclass
class Lookup:
    """The builtin router's view of one forward's fast tier, every layer (rows in router order),
    made by `stack.TableStack` from a `Decision` (one_row.py has the one-row kinds)."""

    tokens: Any  # the TokenBatch it was computed for (identity marks the forward)
    safe_T: torch.Tensor  # token id, 0 where out of vocabulary
    valid_T: torch.Tensor
    fast_LT: torch.Tensor  # served from a table (token or pair entry)
    nominal_LTK: torch.Tensor  # table set (before adaptive k), for verification
    idx_LTK: torch.Tensor  # served set (after adaptive k)
    w_LTK: torch.Tensor  # served weights, scaled like the router's
    # per layer, whether any row is fast: known on the host for CPU tensors only (reading it there
    # is no device sync), None on accelerators
    any_L: list[bool] | None = None
    pair_LT: torch.Tensor | None = None  # the rows of fast_LT served by a pair entry (None: no pair entries)
    token_LT: torch.Tensor | None = None  # the rows served by a token entry (general path only: adaptive-k counts)


@dataclass
class ServedTables:
    """Tables of L layer slots as served: token entries (L, V, ...) and all slots' pair entries."""

    member_LV: torch.Tensor  # bool; demotions write it in place
    idx_LVK: torch.Tensor  # each token's set
    w_LVK: torch.Tensor  # float32, scaled by `scale_weights`
    pair_keys_X: torch.Tensor  # long, `pair_key`s, ascending (empty: no pair entries)
    pair_idx_XK: torch.Tensor
    pair_w_XK: torch.Tensor  # float32, scaled like the token entries'

    @property
    def vocab(self) -> int:
        return int(self.member_LV.shape[1])

    @property
    def has_pairs(self) -> bool:
        return self.pair_keys_X.numel() > 0

    @classmethod
    def build(cls, layers: Mapping[int, Any], pair_tier: Mapping[int, Any], order: Sequence[int],
              scales: Mapping[int, float | None], vocab: int, top_k: int, device: Any = "cpu",
              index_dtype: torch.dtype = torch.long, output_scales: Mapping[int, float] | None = None) -> "ServedTables":
        """Slot i holds layer `order[i]`: its `tables.LayerTable` from `layers` (no entries where
        absent) and its `pairs.PairTable` from `pair_tier`, weights scaled by `scales[layer]` (and
        divided by `output_scales[layer]` where given: see `scale_weights`)."""
        tok = [layers.get(l) for l in order]
        out = output_scales or {}
        member = [t.member_V.bool() if t is not None else torch.zeros(vocab, dtype=torch.bool) for t in tok]
        idx = [t.experts_VK.long() if t is not None else torch.zeros(vocab, top_k, dtype=torch.long) for t in tok]
        w = [scale_weights(t.weights_VK, t.mass_V, scales.get(l), out.get(l, 1.0)) if t is not None
             else torch.zeros(vocab, top_k) for l, t in zip(order, tok)]
        parts = [(i, l, pair_tier[l]) for i, l in enumerate(order) if l in pair_tier and pair_tier[l].size]
        # each slot's keys ascend and slots ascend, so the concatenation is sorted
        keys = [pair_key(i, 0, p.keys_P.long(), vocab) for i, _, p in parts]
        p_idx = [p.sets_PK.long().reshape(p.size, -1) for *_, p in parts]
        p_w = [scale_weights(p.weights_PK.reshape(p.size, -1), p.mass_P, scales.get(l), out.get(l, 1.0))
               for _, l, p in parts]
        cat = lambda xs, empty: torch.cat(xs) if xs else empty  # noqa: E731
        return cls(torch.stack(member).to(device), torch.stack(idx).to(device, index_dtype),
                   torch.stack(w).to(device), cat(keys, torch.zeros(0, dtype=torch.long)).to(device),
                   cat(p_idx, torch.zeros(0, top_k, dtype=torch.long)).to(device, index_dtype),
                   cat(p_w, torch.zeros(0, top_k)).to(device))

    @classmethod
    def token_only(cls, member_LV: torch.Tensor, idx_LVK: torch.Tensor) -> "ServedTables":
        """Token entries' members and sets only (no weights, no pair entries): for predictions."""
        k = idx_LVK.shape[-1]
        return cls(member_LV.bool(), idx_LVK, torch.zeros(idx_LVK.shape), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, k, dtype=idx_LVK.dtype), torch.zeros(0, k))

    @classmethod
    def from_tables(cls, tables: Any, order: Sequence[int]) -> "ServedTables":
        """From a `tables.VARTables` (its metadata names vocabulary and top-k), on the CPU, weights
        scaled by each entry's raw mass (no family scale: for counting decisions)."""
        meta = tables.metadata
        return cls.build(tables.layers, tables.pair_tier, order, {}, int(meta["vocab_size"]), int(meta["top_k"]))


def decide(t: ServedTables, ids_T: torch.Tensor, valid_T: torch.Tensor, prev_T: torch.Tensor | None = None,
           fast: bool = True) -> Decision:
    """The table decision of rows `ids_T` (previous tokens `prev_T`, -1 at a sequence start; None:
    no pair lookup) in every layer slot of `t`. `fast` False: no row is served. Tensor ops only,
    no host sync, on `t`'s device."""
    dev = t.member_LV.device
    ids_T, valid_T = ids_T.to(dev), valid_T.to(dev).bool()
    safe_T = ids_T.clamp(0, t.vocab - 1)  # out-of-vocabulary ids: a valid index, never served
    ok_T = valid_T & (safe_T == ids_T)
    token_LT = t.member_LV[:, safe_T] & ok_T if fast else torch.zeros(t.member_LV.shape[0], ids_T.shape[0],
                                                                       dtype=torch.bool, device=dev)
    idx_LTK, w_LTK, pair_LT = t.idx_LVK[:, safe_T], t.w_LVK[:, safe_T], None
    if fast and prev_T is not None and t.has_pairs:
        slot_L1 = torch.arange(t.member_LV.shape[0], device=dev)[:, None]
        hit_LT, e_LT = find_pairs(t.pair_keys_X, prev_T.to(dev).long(), safe_T, t.vocab, slot_L1)
        pair_LT = pair_serves(token_LT, hit_LT & ok_T)
        idx_LTK = torch.where(pair_LT[..., None], t.pair_idx_XK[e_LT], idx_LTK)
        w_LTK = torch.where(pair_LT[..., None], t.pair_w_XK[e_LT], w_LTK)
    return Decision(safe_T, token_LT, pair_LT, idx_LTK, w_LTK)


def tier_counts(t: ServedTables, ids: Sequence[int], prev_id: int = -1) -> dict[str, int]:
    """Decisions of one sequence's rows `ids` (all valid) summed over layer slots, by tier;
    `prev_id`: the token before ids[0] (-1: the sequence starts there)."""
    if not ids:
        return {"fast": 0, "learned": 0}
    ids_T = torch.tensor(list(ids), dtype=torch.long)
    prev_T = torch.cat([torch.tensor([prev_id], dtype=torch.long), ids_T[:-1]])
    fast = int(decide(t, ids_T, torch.ones_like(ids_T, dtype=torch.bool), prev_T).fast_LT.sum())
    return {"fast": fast, "learned": len(ids) * t.member_LV.shape[0] - fast}
