"""Context statistics: (previous token, token) -> top-k set counts per layer, in bounded memory.

Method (lossy counting, Manku & Motwani 2002, with an adaptive floor). Each layer keeps a sorted
table of integer keys with a count and a `delta` (the most this key's count can be low by):
- mode "set" (C(E, k) <= MAX_SETS): key = (prev * V + token) * S + set_id, one key per
  (pair, exact top-k set);
- mode "expert" (larger E): key = (prev * V + token) * (E + 1) + e for each chosen expert e, plus
  e = E counting the pair's occurrences.
Rows of a batch are appended to a buffer; a flush merges the buffer into the table with
`torch.unique` (sorting, no Python loop). When the table holds more than `capacity` keys, the
keys with the smallest `count + delta` are dropped down to `capacity / 2`, and the largest
dropped bound becomes the error `err` of the layer; a key inserted later gets delta = err,
because it may have been dropped before. Invariant: every key's true count lies in
[count, count + delta], and a key absent from the table occurred at most `err` times.
With `err == 0` (the table never overflowed) every row is exact; the file metadata states `err`
per layer. Only pairs inside one sequence count (the tracker's previous *valid* token).

The sidecar file (schema `PAIR_SCHEMA`) has one row per (layer, prev, token): frequency,
modal_topk_set, modal_set_count (mode "set"), max_undercount, and the raw key ids / counts so
that sidecars merge exactly. Shapes: T rows, K top-k, P pairs. Test: `pytest tests/test_capture_stats.py tests/test_capture_merge.py`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..errors import InvalidInputError
from .schema import PAIR_SCHEMA
from .streaming_stats import MAX_SETS, binomial_table, decode_table, encode_sets

DEFAULT_CAPACITY = 2_000_000  # keys per layer
DEFAULT_BUFFER = 262_144  # buffered keys per layer before a flush


class PairStats:
    def __init__(
        self,
        layer_ids: Sequence[int],
        vocab_size: int,
        num_experts: int,
        top_k: int,
        capacity: int = DEFAULT_CAPACITY,
        buffer_size: int = DEFAULT_BUFFER,
        device: str | torch.device = "cpu",
    ):
        if capacity < 2:
            raise InvalidInputError(f"pair capacity must be >= 2, got {capacity}")
        self.layer_ids = list(layer_ids)
        self.vocab_size, self.num_experts, self.top_k = vocab_size, num_experts, top_k
        self.capacity, self.buffer_size = capacity, buffer_size
        self.device = torch.device(device)
        S = math.comb(num_experts, top_k)
        self.mode = "set" if S <= MAX_SETS and vocab_size * vocab_size * S < 2**62 else "expert"
        self.width = S if self.mode == "set" else num_experts + 1
        if vocab_size * vocab_size * self.width >= 2**62:
            raise InvalidInputError(f"vocabulary {vocab_size} is too large for int64 pair keys")
        self._binom = binomial_table(num_experts, top_k).to(self.device)
        n = len(self.layer_ids)
        self.keys = [torch.zeros(0, dtype=torch.long, device=self.device) for _ in range(n)]
        self.counts = [torch.zeros(0, dtype=torch.long, device=self.device) for _ in range(n)]
        self.deltas = [torch.zeros(0, dtype=torch.long, device=self.device) for _ in range(n)]
        self.err = [0] * n
        self._buffer: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._buffered = [0] * n

    # -- updates -------------------------------------------------------------------------------
    def update(self, slot: int, prev_T: torch.Tensor, ids_T: torch.Tensor, topk_idx_TK: torch.Tensor) -> None:
        """Add valid rows of one slot; rows with prev < 0 (sequence start) are skipped."""
        self.update_layers([slot], prev_T, ids_T, topk_idx_TK[None])

    def update_layers(self, slots: Sequence[int], prev_T: torch.Tensor, ids_T: torch.Tensor, topk_idx_LTK: torch.Tensor,
                      set_LT: torch.Tensor | None = None) -> None:
        """Add the same valid tokens as routed by several slots (`set_LT`: their set ids, if known)."""
        has = (prev_T >= 0).to(self.device)
        prev, tok = prev_T.to(self.device)[has].long(), ids_T.to(self.device)[has].long()
        pair_T = prev * self.vocab_size + tok
        idx_LTK = topk_idx_LTK.to(self.device)[:, has].long()
        if self.mode == "set":
            if set_LT is None:
                L, T, K = idx_LTK.shape
                sets = encode_sets(idx_LTK.reshape(L * T, K), self._binom).reshape(L, T)
            else:
                sets = set_LT.to(self.device)[:, has]
            keys_L = pair_T[None, :] * self.width + sets
        else:
            total = idx_LTK.new_full((*idx_LTK.shape[:2], 1), self.num_experts)
            keys_L = (pair_T[None, :, None] * self.width + torch.cat([idx_LTK, total], dim=2)).flatten(1)
        for j, slot in enumerate(slots):  # a loop over layers, not tokens
            self._buffer[slot].append(keys_L[j])
            self._buffered[slot] += keys_L.shape[1]
            if self._buffered[slot] >= self.buffer_size:
                self._flush(slot)

    def _combine(self, slot: int, keys_b, counts_b, deltas_b, err_b: int) -> None:
        """Merge a (sorted, unique) key table into the slot's table; prune past capacity."""
        keys_a, counts_a, deltas_a, err_a = self.keys[slot], self.counts[slot], self.deltas[slot], self.err[slot]
        keys, inv = torch.unique(torch.cat([keys_a, keys_b]), return_inverse=True)
        counts = torch.zeros_like(keys).index_add_(0, inv, torch.cat([counts_a, counts_b]))
        # a key missing from one side may have been dropped there: it may be low by that side's err
        deltas = torch.zeros_like(keys).index_add_(0, inv, torch.cat([deltas_a, deltas_b]))
        in_a = torch.zeros_like(keys, dtype=torch.bool).index_fill_(0, inv[: keys_a.numel()], True)
        in_b = torch.zeros_like(keys, dtype=torch.bool).index_fill_(0, inv[keys_a.numel():], True)
        deltas += (~in_a).long() * err_a + (~in_b).long() * err_b
        err = err_a + err_b
        if keys.numel() > self.capacity:
            bound = counts + deltas
            drop = keys.numel() - self.capacity // 2
            floor = int(bound.kthvalue(drop).values)
            keep = bound > floor
            err = max(err, floor)
            keys, counts, deltas = keys[keep], counts[keep], deltas[keep]
        self.keys[slot], self.counts[slot], self.deltas[slot], self.err[slot] = keys, counts, deltas, err

    def _flush(self, slot: int) -> None:
        if not self._buffer[slot]:
            return
        uniq, cnt = torch.unique(torch.cat(self._buffer[slot]), return_counts=True)
        self._buffer[slot], self._buffered[slot] = [], 0
        # a key new to the table may have been dropped before: _combine gives it delta = err
        self._combine(slot, uniq, cnt, torch.zeros_like(uniq), 0)

    def flush(self) -> None:
        for slot in range(len(self.layer_ids)):
            self._flush(slot)

    # -- merge / state ------------------------------------------------------------------------
    def merge(self, other: "PairStats") -> "PairStats":
        if (other.layer_ids, other.vocab_size, other.mode, other.width) != (self.layer_ids, self.vocab_size, self.mode, self.width):
            raise InvalidInputError("cannot merge pair statistics of different layers / vocabularies / modes")
        self.flush()
        other.flush()
        for slot in range(len(self.layer_ids)):
            self._combine(slot, other.keys[slot].to(self.device), other.counts[slot].to(self.device),
                          other.deltas[slot].to(self.device), other.err[slot])
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.flush()
        out = {"pairs.err": torch.tensor(self.err, dtype=torch.long)}
        for slot in range(len(self.layer_ids)):
            out[f"pairs.keys.{slot}"] = self.keys[slot].cpu().contiguous()
            out[f"pairs.counts.{slot}"] = self.counts[slot].cpu().contiguous()
            out[f"pairs.deltas.{slot}"] = self.deltas[slot].cpu().contiguous()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.err = [int(x) for x in state["pairs.err"].tolist()]
        if len(self.err) != len(self.layer_ids):
            raise InvalidInputError("pair state has a different number of layers")
        for slot in range(len(self.layer_ids)):
            self.keys[slot] = state[f"pairs.keys.{slot}"].to(self.device)
            self.counts[slot] = state[f"pairs.counts.{slot}"].to(self.device)
            self.deltas[slot] = state[f"pairs.deltas.{slot}"].to(self.device)
        self._buffer = [[] for _ in self.layer_ids]
        self._buffered = [0] * len(self.layer_ids)

    def reset(self) -> None:
        self.load_state_dict({k: v[:0] if k != "pairs.err" else torch.zeros_like(v) for k, v in self.state_dict().items()})

    def describe(self) -> dict[str, Any]:
        self.flush()
        return {
            "method": "lossy counting (Manku & Motwani) with adaptive floor; exact where error_bound is 0",
            "mode": self.mode,
            "capacity_keys_per_layer": self.capacity,
            "error_bound": {str(layer): self.err[s] for s, layer in enumerate(self.layer_ids)},
            "keys": {str(layer): int(self.keys[s].numel()) for s, layer in enumerate(self.layer_ids)},
        }

    # -- output -------------------------------------------------------------------------------
    def to_dataframe(self):
        """One row per (layer, prev, token) in the table; see the module docstring."""
        self.flush()
        parts = [self._slot_table(s) for s in range(len(self.layer_ids))]
        return pa.concat_tables(parts).to_pandas()

    def _slot_table(self, slot: int) -> pa.Table:
        keys, counts, deltas = self.keys[slot].cpu(), self.counts[slot].cpu(), self.deltas[slot].cpu()
        pair_N, sub_N = keys // self.width, keys % self.width
        pairs_P, pinv_N, n_P = torch.unique_consecutive(pair_N, return_inverse=True, return_counts=True)
        P, K, err = pairs_P.numel(), self.top_k, self.err[slot]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), n_P.cumsum(0)])
        delta_sum = torch.zeros(P, dtype=torch.long).index_add_(0, pinv_N, deltas)
        if self.mode == "set":
            freq = torch.zeros(P, dtype=torch.long).index_add_(0, pinv_N, counts)
            best = torch.zeros(P, dtype=torch.long).scatter_reduce(0, pinv_N, counts, "amax", include_self=False)
            pos_N = torch.arange(keys.numel())
            cand = torch.where(counts == best[pinv_N], pos_N, torch.full_like(pos_N, keys.numel()))
            first = torch.full((P,), keys.numel(), dtype=torch.long).scatter_reduce(0, pinv_N, cand, "amin")
            modal_PK = decode_table(self.num_experts, K)[sub_N[first]] if P else torch.zeros(0, K, dtype=torch.long)
            modal_count = pa.array(best.numpy(), type=pa.int64())
            undercount = delta_sum + (self.width - n_P) * err
        else:
            is_total = sub_N == self.num_experts
            freq = torch.zeros(P, dtype=torch.long).index_add_(0, pinv_N[is_total], counts[is_total])
            dense_PE = torch.zeros(P, self.num_experts + 1, dtype=torch.long)
            dense_PE[pinv_N, sub_N] = counts
            # ties broken towards the lowest expert index
            score = dense_PE[:, : self.num_experts].double() - torch.arange(self.num_experts) * 1e-9
            modal_PK = score.topk(K, dim=1).indices.sort(dim=1).values
            modal_count = pa.nulls(P, type=pa.int64())
            has_total = torch.zeros(P, dtype=torch.bool).index_fill_(0, pinv_N[is_total], True)
            undercount = torch.where(has_total, torch.zeros(P, dtype=torch.long).index_add_(0, pinv_N[is_total], deltas[is_total]),
                                     torch.full((P,), err, dtype=torch.long))
        off = pa.array(offsets.numpy().astype(np.int32))
        modal_off = pa.array(np.arange(0, P * K + 1, K, dtype=np.int32))
        cols = {
            "layer": pa.array(np.full(P, self.layer_ids[slot], dtype=np.int32)),
            "prev_token_id": pa.array((pairs_P // self.vocab_size).numpy().astype(np.int32)),
            "token_id": pa.array((pairs_P % self.vocab_size).numpy().astype(np.int32)),
            "frequency": pa.array(freq.numpy()),
            "modal_topk_set": pa.ListArray.from_arrays(modal_off, pa.array(modal_PK.reshape(-1).numpy().astype(np.int32))),
            "modal_set_count": modal_count,
            "max_undercount": pa.array(undercount.numpy()),
            "key_ids": pa.ListArray.from_arrays(off, pa.array(sub_N.numpy())),
            "key_counts": pa.ListArray.from_arrays(off, pa.array(counts.numpy())),
        }
        return pa.Table.from_pydict(cols, schema=PAIR_SCHEMA)

    @classmethod
    def from_dataframe(cls, df, metadata: dict[str, Any], capacity: int = DEFAULT_CAPACITY) -> "PairStats":
        """Rebuild a table from a sidecar (per-key deltas are not stored: rows with undercount keep it as err)."""
        layers = [int(x) for x in metadata["layers"]]
        out = cls(layers, int(metadata["vocab_size"]), int(metadata["num_experts"]), int(metadata["top_k"]), capacity=capacity)
        if metadata.get("pairs", {}).get("mode", out.mode) != out.mode:
            raise InvalidInputError("pair sidecar was written in another key mode")
        bounds = metadata.get("pairs", {}).get("error_bound", {})
        lengths = df["key_ids"].map(len).to_numpy() if len(df) else np.zeros(0, dtype=np.int64)
        for slot, layer in enumerate(layers):
            sel = (df["layer"].to_numpy() == layer) if len(df) else np.zeros(0, dtype=bool)
            out.err[slot] = int(bounds.get(str(layer), 0))
            if not sel.any():
                continue
            sub = df[sel]
            pair = sub["prev_token_id"].to_numpy().astype(np.int64) * out.vocab_size + sub["token_id"].to_numpy()
            ids = np.concatenate(sub["key_ids"].to_numpy()).astype(np.int64)
            counts = np.concatenate(sub["key_counts"].to_numpy()).astype(np.int64)
            keys = np.repeat(pair, lengths[sel]) * out.width + ids
            order = np.argsort(keys, kind="stable")
            out.keys[slot] = torch.from_numpy(keys[order])
            out.counts[slot] = torch.from_numpy(counts[order])
            # the per-key split of an undercount is not stored; a conservative bound is the layer err
            out.deltas[slot] = torch.full_like(out.keys[slot], out.err[slot])
        return out
