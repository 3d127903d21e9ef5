"""One-row CPU steps (batch-1 decoding) decided on the host, once, as the forward starts.

Inside a decode step each small tensor op and line of Python costs several times what it costs
alone, so the general lookup's tensor ops over (layers x tokens) are too dear for a one-row step.
The tracker hands such a step's token id, padding flag and context to `TableStack.begin_forward`
as host ints (`TokenBatch.one`); `OneRowHost` makes `served.decide`'s decision, with the same
pair-key codec and precedence rule, from host mirrors of the stacked tables (rebuilt after each
demotion):
- a step no layer serves (padding, or no token entry in any layer and no pair entry that can
  serve) -> `EmptyStep`: nothing is fast;
- otherwise, where the config allows (no adaptive k, table weights) -> `HostStep`: per layer the
  served set and weights as (1, K) tensors, cloned out of the tables once per step (never views:
  a model may scale routing weights in place).
Either is counted in the stack's host counters (`TableStack.reset_counts`); each router then
returns its row or the learned decision at once (`VARRouter.forward`, when no audit or shadow
check runs). Accelerators never take this path (their tables are not on the host).

Shapes: L layers, K top-k, V vocabulary, X stacked pair entries.
Test: `pytest tests/test_var_decode_step.py tests/test_served_decision.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from .served import Lookup, pair_key, split_key

Row = tuple[torch.Tensor, torch.Tensor] | None  # one layer's served (idx_1K, w_1K), None = learned


class EmptyStep(Lookup):
    """The lookup of a one-row step no layer serves: nothing is fast; `safe_T` / `valid_T` are
    built from the tokens only if a reader asks."""

    def __init__(self, tok: Any, empty: tuple[torch.Tensor, torch.Tensor, torch.Tensor], none_L: list[bool]):
        self.tokens = tok
        self.fast_LT, self.idx_LTK, self.w_LTK = empty
        self.nominal_LTK = self.idx_LTK
        self.any_L, self.pair_LT = none_L, None

    @property
    def safe_T(self) -> torch.Tensor:  # the id is in the vocabulary (checked on the host)
        return self.tokens.ids_T

    @property
    def valid_T(self) -> torch.Tensor:
        return self.tokens.valid_T


class HostStep(Lookup):
    """The lookup of a served one-row step: `any_L` from the host; the (L, T) tensors are the
    general path's (`TableStack.resolve`, which counts nothing), built when first read."""

    def __init__(self, tok: Any, any_L: list[bool], stack: Any):
        self.tokens, self.any_L = tok, any_L
        self._stack, self._full = stack, None

    def _get(self, name: str) -> Any:
        if self._full is None:
            self._full = self._stack.resolve(self.tokens, self._stack.member_LV.device)
        return getattr(self._full, name)

    safe_T = property(lambda self: self._get("safe_T"))
    valid_T = property(lambda self: self._get("valid_T"))
    fast_LT = property(lambda self: self._get("fast_LT"))
    nominal_LTK = property(lambda self: self._get("nominal_LTK"))
    idx_LTK = property(lambda self: self._get("idx_LTK"))
    w_LTK = property(lambda self: self._get("w_LTK"))
    pair_LT = property(lambda self: self._get("pair_LT"))


class OneRowHost:
    """Host mirrors of one CPU `TableStack` and the steps decided from them."""

    def __init__(self, stack: Any):
        self.stack = stack
        n = len(stack.layers)
        k = stack.idx_LVK.shape[-1]
        self.empty = (torch.zeros(n, 1, dtype=torch.bool), torch.zeros(n, 1, k, dtype=stack.idx_LVK.dtype),
                      torch.zeros(n, 1, k, dtype=stack.weights_LVK.dtype))
        self.none_L = [False] * n
        self.none_rows: list[Row] = [None] * n
        cfg = stack.config
        # a served step needs only the table's set and weights: no adaptive-k count, no learned-weight
        # restriction
        self.serve = not cfg.adaptive_k and cfg.weights_source == "table"
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the mirrors from the stack's tables (after construction and each demotion)."""
        s = self.stack
        on = s.config.enable_fast_path
        member_VL = s.member_LV.t().contiguous() if on else torch.zeros_like(s.member_LV.t())
        self.open_V = member_VL.any(1).tolist()
        self.member_VL = member_VL.numpy()
        # (previous * V + token) -> [(slot, entry)] of the pair entries that can serve (their layer
        # has no token entry for the token)
        self.pairs: dict[int, list[tuple[int, int]]] = {}
        if on and s.has_pairs:
            x_X = s.pair_open_X.nonzero().squeeze(1)  # refreshed before this (TableStack)
            slot_X, prev_X, tok_X = split_key(s.served.pair_keys_X[x_X], s.vocab)
            for key, slot, x in zip(pair_key(0, prev_X, tok_X, s.vocab).tolist(), slot_X.tolist(), x_X.tolist()):
                self.pairs.setdefault(key, []).append((slot, x))

    def step(self, tok: Any) -> tuple[Lookup, list[Row]] | None:
        """(lookup, rows) of a one-row step (`tok.one` set), counted; None where the general path
        must run."""
        tid, valid, context = tok.one
        s = self.stack
        if not 0 <= tid < s.vocab:
            return None
        pair = (self.pairs.get(pair_key(0, context[-1], tid, s.vocab))
                if valid and self.pairs and context and context[-1] >= 0 else None)
        if valid and (self.open_V[tid] or pair is not None):
            if not self.serve:
                return None
            look, rows = self._served(tok, tid, pair)
        else:  # padding is never fast
            look, rows = EmptyStep(tok, self.empty, self.none_L), self.none_rows
            if s.config.track_performance:
                s.host_valid += valid
        s.forwards += 1
        if s.on_rows is not None:
            s.on_rows(look)
        return look, rows

    def _served(self, tok: Any, tid: int, pair: list[tuple[int, int]] | None) -> tuple[Lookup, list[Row]]:
        s = self.stack
        member = self.member_VL[tid].tolist()
        rows: list[Row] = [None] * len(member)
        if any(member):
            idx_LK, w_LK = s.idx_LVK[:, tid].clone(), s.weights_LVK[:, tid].clone()
            for slot, m in enumerate(member):
                if m:
                    rows[slot] = (idx_LK[slot:slot + 1], w_LK[slot:slot + 1])
        for slot, x in pair or ():
            rows[slot] = (s.pair_idx_XK[x:x + 1].clone(), s.pair_w_XK[x:x + 1].clone())
        any_L = [r is not None for r in rows]
        if s.config.track_performance:
            s.host_valid += 1
            for slot, hit in enumerate(any_L):
                s.host_fast_L[slot] += hit
            for slot, _ in pair or ():
                s.host_pair_L[slot] += 1
        return HostStep(tok, any_L, s), rows
