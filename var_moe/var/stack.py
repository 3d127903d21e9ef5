"""`TableStack`: the verified tables of all patched layers as served (`served.ServedTables`),
shared by the routers of one `VARModelWrapper`, with the per-forward decision and the counters.

The fast tier depends on token ids (and previous tokens) only, so `TableStack.lookup` decides it
for every layer at once, at the first router call of a forward (`served.decide`; previous tokens
from the tracker, carried across decode steps), and counts it on the device. On CPU, where reading
a tensor is no device sync, the lookup also notes which layers have a fast row (a layer without one
returns the learned decision as is) and skips the pair search where it can (`_may_pair`). One-row
CPU steps are decided on the host as they start instead (`begin_forward`, one_row.py).

Pair rows count as fast and separately as `fast_pair`; adaptive k leaves them whole.

Shapes: T tokens, K top-k, V vocabulary, L layers, X stacked pair entries.
Test: `pytest tests/test_var_router.py tests/test_var_decode_step.py tests/test_served_decision.py`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from .config import VARConfig
from .one_row import OneRowHost
from .pairs import PairTable
from .served import TIERS, Lookup, ServedTables, decide, pair_serves, split_key
from .tables import LayerTable

# counters kept per router in one int64 tensor (no host sync per forward); the tiers (served.TIERS) first
COUNTERS = TIERS + ("shadow_agree", "shadow_disagree", "demoted", "fallback_forwards", "audit_fast_n",
                    "audit_fast_exact", "audit_fast_overlap_x1000", "adaptive_single", "forwards", "fast_pair")
C = {name: i for i, name in enumerate(COUNTERS)}


class TableStack:
    """The tables of all patched layers stacked on device (L, V, ...). Routers read their layer's
    row (`member_LV[slot]` etc.) at each use, so a demotion is one in-place write. Counters live in
    `counts_LC` (int64, on device), read with `counts()`: every tier is known at lookup time, so a
    forward adds only its fast rows per layer and its valid tokens (forwards are counted on the
    host), and the learned column is their difference."""

    def __init__(self, tables: dict[int, LayerTable], layers: list[int], config: VARConfig, num_experts: int,
                 scales: dict[int, float | None], device: torch.device, index_dtype: torch.dtype,
                 pair_tier: dict[int, PairTable] | None = None):
        """`layers` in slot order, each with a table in `tables`; weights scaled by `scales[layer]`."""
        self.layers, self.config = layers, config
        self.slot = {l: i for i, l in enumerate(layers)}
        st = lambda name: torch.stack([getattr(tables[l], name) for l in layers]).to(device)  # noqa: E731
        vocab, k = tables[layers[0]].experts_VK.shape
        served = ServedTables.build(tables, pair_tier or {}, layers, scales, int(vocab), int(k), device, index_dtype)
        self.member_LV, self.nominal_LVK = served.member_LV, served.idx_LVK
        self.bound_LV = st("bound_V").clone()
        self.agree_LV, self.total_LV = st("agree_V"), st("total_V")
        self.single_LV = st("weights_VK")[..., 0] >= config.adaptive_k_min_weight
        if config.adaptive_k:  # one expert, full weight; other slots -> the experts' empty slot E
            slot0 = torch.arange(k, device=device) == 0
            one = self.single_LV[..., None]
            w = served.w_LVK
            served = replace(served, idx_LVK=torch.where(one & ~slot0, torch.full_like(served.idx_LVK, num_experts),
                                                         served.idx_LVK),
                             w_LVK=torch.where(one, torch.where(slot0, w.sum(-1, keepdim=True), 0.0), w))
        self.served = served
        # read at every one-row step (one_row.py): attributes of their own, one attribute read each
        self.idx_LVK, self.weights_LVK, self.vocab = served.idx_LVK, served.w_LVK, served.vocab
        self.pair_idx_XK, self.pair_w_XK = served.pair_idx_XK, served.pair_w_XK
        self.has_pairs = served.has_pairs  # decided once, on the host: without pair entries no lookup searches pairs
        if self.has_pairs:
            self.pair_slot_X, _, self.pair_tok_X = split_key(served.pair_keys_X, self.vocab)
            self.pair_tok_V = torch.zeros(self.vocab, dtype=torch.bool, device=device)
            self._refresh_pair_tokens()
        self.shadow_agree_LV = torch.zeros_like(self.agree_LV)
        self.shadow_total_LV = torch.zeros_like(self.total_LV)
        self.pending_LV = torch.zeros_like(self.member_LV)
        self.reset_counts()
        self.frozen = False
        self.on_rows: Callable[[Lookup], None] | None = None
        self._last: Lookup | None = None
        # batch-1 decoding on CPU: steps decided on the host as they start (one_row.py); the
        # current step's rows per layer (None: not decided on the host)
        self.host = OneRowHost(self) if device.type == "cpu" else None
        self.step_rows: list | None = None

    def reset_counts(self) -> None:
        """All counters from zero (they start here)."""
        n, device = len(self.layers), self.member_LV.device
        self.counts_LC = torch.zeros(n, len(COUNTERS), dtype=torch.long, device=device)
        # the lookup-time counts (see counts()): on the device, and as host ints for one-row steps
        self.fast_L = torch.zeros(n, dtype=torch.long, device=device)
        self.pair_L = torch.zeros(n, dtype=torch.long, device=device)
        self.valid_tokens = torch.zeros((), dtype=torch.long, device=device)
        self.host_valid, self.host_fast_L, self.host_pair_L = 0, [0] * n, [0] * n
        self.forwards = 0

    def _refresh_pair_tokens(self) -> None:
        """Tokens that end a pair entry that can serve (its layer has no token entry for the token),
        for `_may_pair`. Entries whose token has a token entry never serve while it stands (most of
        layer 0's); a demotion may open them, so this is recomputed after each (tensor ops, no host
        sync)."""
        self.pair_open_X = pair_serves(self.member_LV[self.pair_slot_X, self.pair_tok_X], True)  # also read by one_row.py
        self.pair_tok_V.zero_()
        self.pair_tok_V[self.pair_tok_X[self.pair_open_X]] = True

    @property
    def skip_step(self) -> bool:
        """The forward in flight is a one-row step that no layer serves (decided as it started)."""
        return self.host is not None and self.step_rows is self.host.none_rows

    def begin_forward(self, tok: Any) -> None:
        """Called as each forward starts, while the routers are on (the tracker's `on_batch`): a
        one-row CPU step is decided and counted here, once (one_row.py), and `step_rows` gives each
        router its row (or None: the learned decision) without further work."""
        self.step_rows = None
        if tok is not None and self.host is not None and tok.one is not None:
            self.apply_demotions()
            got = self.host.step(tok)
            if got is not None:
                self._last, self.step_rows = got

    def lookup_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fast_L, valid): fast rows per layer and valid tokens (0-d) counted at lookup time, the
        device counters plus the host counters of one-row steps."""
        fast_L = self.fast_L
        if self.host is not None:
            fast_L = fast_L + torch.tensor(self.host_fast_L, device=fast_L.device)
        return fast_L, self.valid_tokens + self.host_valid

    def _may_pair(self, safe_T: torch.Tensor) -> bool:
        """False only where it is known for free that no token of this forward ends a pair entry: on
        CPU (reading a CPU tensor is no device sync; most decode steps have no such token). On
        accelerators always True, so the lookup never waits for the device."""
        return safe_T.device.type != "cpu" or bool(self.pair_tok_V[safe_T].any())

    def counts(self) -> torch.Tensor:
        """(L, len(COUNTERS)) all counters, the lookup-time ones folded in (one new tensor)."""
        out = self.counts_LC.clone()
        fast_L, valid = self.lookup_counts()
        out[:, C["fast"]] += fast_L
        out[:, C["learned"]] += valid - fast_L
        out[:, C["forwards"]] += self.forwards
        out[:, C["fast_pair"]] += self.pair_L
        if self.host is not None:
            out[:, C["fast_pair"]] += torch.tensor(self.host_pair_L, device=out.device)
        return out

    def apply_demotions(self) -> None:
        """Take queued entries out (between forwards; a no-op while frozen)."""
        if self.frozen or self.config.shadow_rate <= 0:
            return
        drop = self.pending_LV & self.member_LV
        self.counts_LC[:, C["demoted"]] += drop.sum(1)
        self.member_LV &= ~drop
        self.pending_LV.zero_()
        if self.has_pairs:
            self._refresh_pair_tokens()
        if self.host is not None and bool(drop.any()):  # CPU only: no device to sync with
            self.host.refresh()

    def lookup(self, tok: Any, device: torch.device) -> Lookup:
        """The forward's lookup (`tok` marks the forward), resolved and counted at its first router
        call, or the one `begin_forward` decided on the host."""
        if self._last is not None and self._last.tokens is tok:
            return self._last
        self.apply_demotions()
        look = self.resolve(tok, device)
        self.forwards += 1
        if self.config.track_performance:
            self.fast_L += look.fast_LT.sum(1)
            self.valid_tokens += look.valid_T.sum()
            if look.pair_LT is not None:
                self.pair_L += look.pair_LT.sum(1)
            if self.config.adaptive_k:
                self.counts_LC[:, C["adaptive_single"]] += (look.token_LT & self.single_LV[:, look.safe_T]).sum(1)
        if self.on_rows is not None:
            self.on_rows(look)
        self._last = look
        return look

    def resolve(self, tok: Any, device: torch.device) -> Lookup:
        """The fast tier of every layer (`served.decide`), counting nothing (a one-row `HostStep`
        builds its tensors from it when audit or shadow checks read them)."""
        ids_T = tok.ids_T.to(device)
        on = self.config.enable_fast_path
        pairs = on and self.has_pairs and self._may_pair(ids_T.clamp(0, self.vocab - 1))
        d = decide(self.served, ids_T, tok.valid_T, tok.prev_T if pairs else None, fast=on)
        fast_LT = d.fast_LT
        nominal_LTK = d.idx_LTK
        if self.config.adaptive_k:  # the pre-adaptive-k set, read only by verification
            nominal_LTK = self.nominal_LVK[:, d.safe_T]
            if d.pair_LT is not None:  # pair rows keep their whole set
                nominal_LTK = torch.where(d.pair_LT[..., None], d.idx_LTK, nominal_LTK)
        any_L = fast_LT.any(1).tolist() if fast_LT.device.type == "cpu" else None
        valid_T = tok.valid_T.to(device).bool()
        return Lookup(tok, d.safe_T, valid_T, fast_LT, nominal_LTK, d.idx_LTK, d.w_LTK, any_L, d.pair_LT, d.token_LT)
