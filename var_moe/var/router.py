"""`VARRouter`: drop-in replacement of one MoE layer's router with three tiers per token.

For each row (token) of the (T, H) hidden states:
  fast    - the token is in this layer's verified table: use the table's expert set; or, where
            the token has no entry, the (previous token, token) pair is a certified pair entry
            (`pairs.py`, tables built with `pair_entries`): use the pair's set,
  cached  - else the (last W tokens, token) key is in this layer's context cache: repeat that
            learned decision (off in the presets),
  learned - else (and for padding, and when token ids are unknown): the original router.
It returns the transformers v5 router contract `(router_logits, weights, indices)`, so the
experts run untouched.

The fast tier depends on token ids only, so `TableStack.lookup` resolves it for every layer at
once, at the first router call of a forward: one gather over (layers x tokens) of the stacked
tables, plus the tier counters (on device). Per layer the router then runs the learned router on
all rows (it is ~1% of a forward, and running it on a subset would need the subset's size on the
host) and selects rows with `torch.where` over the precomputed rows: no boolean-mask indexing
and no host synchronisation on this path. An empty table therefore returns the learned outputs
unchanged (bit for bit). On CPU the lookup also reads which layers have any fast row (no device
to sync with), and a layer without one returns the learned decision without the selects. The cached tier, when on, looks up and fills a `ContextCache`, which
does index with masks and syncs with the host; it is the one place that does.

Batch-1 decoding on CPU: inside a decode step every small tensor op and every line of Python costs
several times what it costs in a loop of its own (measured: the tracker's hook took 102 us in a
5 ms step against 22 us alone), so a step does as little as it can. The tracker hands the step's
token id to `TableStack.begin_forward` as host ints; a token that no layer can serve (no token
entry in any layer, not the end of a servable pair entry: a host list) is resolved and counted
there (`_EmptyStep`, a host counter), and each router returns its learned decision at once
(`skip_step`) when it has nothing else to do (no cache, audit or shadow checks).

Pair entries of all layers sit in one sorted key tensor (slot * V**2 + previous * V + token); the
lookup finds them with one `torch.searchsorted` over (layers x tokens), on device, only for valid
rows with a previous token (the tracker's, carried across decode steps) and no token entry; they
are counted as fast rows and separately as `fast_pair`. Without pair entries none of this runs, and
on CPU neither does it for a forward in which no token ends a pair entry (most decode steps).
Shadow checks of pair rows count towards the shadow agreement counters but never towards a token
entry's evidence (pair entries are not demoted in service); adaptive k leaves pair rows whole.

Weights (`weights_source`): "table" uses the table's stored weights, scaled the way the router
normalises (a probe at construction measures whether its top-k weights sum to a constant, e.g. 1
for Mixtral); "learned" restricts the learned probabilities to the chosen set. router_logits are
the learned router's (computed for every row anyway).

Adaptive k: fast rows whose table gives the top expert >= `adaptive_k_min_weight` of the set's
weight go to that expert alone with the full weight; the other slots hold index E (the experts'
empty slot) with weight 0 -- precomputed in the stacked tables, so it costs nothing per forward.
Shadow verification compares a seeded sample of fast rows with the learned decision (already
computed) and queues demotions (`tables.demote_mask`: the running Wilson bound over certifying +
shadow evidence below target, or, after `shadow_min_checks` checks, the shadow upper bound below
target). Queued demotions are applied between forwards (`TableStack.apply_demotions`), never
inside one, and not at all while the tables are frozen (`VARModelWrapper.frozen_tables()`, used
by timed passes). Audit mode counts agreement of every fast/cached row without demoting.

Shapes: T tokens, H hidden, E experts, K top-k, V vocabulary, L layers, W context window.
Test: `pytest tests/test_var_router.py tests/test_var_exact.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .cache import ContextCache
from .config import VARConfig
from .pairs import PairTable, find_pairs
from .tables import LayerTable, demote_mask, wilson_lower_bound

FAST, CACHED, LEARNED = 0, 1, 2
TIERS = ("fast", "cached", "learned")
# counters kept per router in one int64 tensor (no host sync per forward)
COUNTERS = ("fast", "cached", "learned", "cache_lookups", "cache_hits", "cache_inserts", "shadow_agree",
            "shadow_disagree", "demoted", "fallback_forwards", "audit_fast_n", "audit_fast_exact",
            "audit_fast_overlap_x1000", "audit_cached_n", "audit_cached_exact", "audit_cached_overlap_x1000",
            "adaptive_single", "forwards", "fast_pair")
C = {name: i for i, name in enumerate(COUNTERS)}


def compare_sets(a_TK: torch.Tensor, b_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact_T, overlap_T): identical top-k sets, and |a & b| / K."""
    exact = (a_TK.sort(1).values == b_TK.sort(1).values).all(1)
    overlap = (a_TK[:, :, None] == b_TK[:, None, :]).any(2).sum(1).float() / a_TK.shape[1]
    return exact, overlap


@dataclass
class Lookup:
    """The fast tier of one forward, for every layer (rows in router order)."""

    tokens: Any  # the TokenBatch it was computed for (identity marks the forward)
    safe_T: torch.Tensor  # token id, 0 where out of vocabulary
    valid_T: torch.Tensor
    fast_LT: torch.Tensor  # served from a table: token entry, or (previous, token) entry where the token has none
    nominal_LTK: torch.Tensor  # table set (before adaptive k), for verification
    idx_LTK: torch.Tensor  # served set (after adaptive k)
    w_LTK: torch.Tensor  # served weights, scaled like the router's
    # per layer, whether any row is fast: known on the host for CPU tensors only (reading it there
    # is no device sync), None on accelerators
    any_L: list[bool] | None = None
    pair_LT: torch.Tensor | None = None  # the rows of fast_LT served by a pair entry (None: no pair entries)


class _EmptyStep(Lookup):
    """The lookup of a one-row CPU step whose token no layer serves (`TableStack._empty_step`):
    nothing is fast; `safe_T` / `valid_T` are built from the tokens only if a reader asks (the
    cache, audit and shadow paths; the plain skip reads neither)."""

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


class TableStack:
    """The tables of all patched layers stacked on device (L, V, ...), shared by the routers.

    Each router holds views of its row (`member_LV[slot]` etc.), so a demotion is one write seen
    by both. Counters live in `counts_LC` (int64, on device); read them with `counts()`. When the
    cache is off every tier is known at lookup time, and a forward adds only its fast rows per
    layer and its valid-token count (two in-place adds; forwards are counted on the host); the
    learned column is their difference, filled in by `counts()`."""

    def __init__(self, tables: dict[int, LayerTable], layers: list[int], config: VARConfig, num_experts: int,
                 scales: dict[int, float | None], device: torch.device, index_dtype: torch.dtype,
                 pair_tier: dict[int, PairTable] | None = None):
        self.layers, self.config, self.num_experts = layers, config, num_experts
        self.slot = {l: i for i, l in enumerate(layers)}
        st = lambda name: torch.stack([getattr(tables[l], name) for l in layers]).to(device)  # noqa: E731
        self.member_LV = st("member_V").clone()
        self.bound_LV = st("bound_V").clone()
        self.agree_LV, self.total_LV = st("agree_V"), st("total_V")
        self.nominal_LVK = st("experts_VK").to(index_dtype)
        w_LVK = st("weights_VK").float()
        mass_LV = st("mass_V").float()
        scale_L1 = torch.tensor([[s if s is not None else float("nan")] for s in (scales[l] for l in layers)],
                                device=device)
        # routers whose weights do not sum to a constant use the table's raw mass instead
        scaled = torch.where(scale_L1.isnan()[..., None], w_LVK * mass_LV[..., None], w_LVK * scale_L1[..., None])
        self.weights_LVK = scaled
        self.idx_LVK = self.nominal_LVK
        self.single_LV = w_LVK[..., 0] >= config.adaptive_k_min_weight
        if config.adaptive_k:  # one expert, full weight; other slots -> the experts' empty slot E
            slot0 = torch.arange(self.nominal_LVK.shape[-1], device=device) == 0
            one = self.single_LV[..., None]
            self.idx_LVK = torch.where(one & ~slot0, torch.full_like(self.nominal_LVK, num_experts), self.nominal_LVK)
            self.weights_LVK = torch.where(one, torch.where(slot0, scaled.sum(-1, keepdim=True), 0.0), scaled)
        self.vocab = int(self.member_LV.shape[1])
        self._stack_pairs(pair_tier or {}, scale_L1, device, index_dtype)
        self.shadow_agree_LV = torch.zeros_like(self.agree_LV)
        self.shadow_total_LV = torch.zeros_like(self.total_LV)
        self.pending_LV = torch.zeros_like(self.member_LV)
        self.counts_LC = torch.zeros(len(layers), len(COUNTERS), dtype=torch.long, device=device)
        # the lookup-time counts of the cache-off path (see counts())
        self.fast_L = torch.zeros(len(layers), dtype=torch.long, device=device)
        self.pair_L = torch.zeros(len(layers), dtype=torch.long, device=device)
        self.valid_tokens = torch.zeros((), dtype=torch.long, device=device)
        self.host_valid = 0  # valid tokens of the one-row CPU steps that took `_empty_step` (a host int)
        self.forwards = 0
        self.frozen = False
        self.counts_fast_path = not config.cache_enabled  # tiers fully known at lookup time
        self.on_rows: Callable[[torch.Tensor, Any], None] | None = None
        self._last: Lookup | None = None
        # one-row CPU steps (batch-1 decoding): a host list of the tokens that may be served in some
        # layer (a token entry, or the end of a pair entry that can serve), and the all-learned
        # lookup's tensors; a step whose token is not in the list skips the gathers (`_empty_step`)
        self._step_open: list[bool] | None = None
        if device.type == "cpu":
            k = self.idx_LVK.shape[-1]
            self._empty1 = (torch.zeros(len(layers), 1, dtype=torch.bool),
                            torch.zeros(len(layers), 1, k, dtype=self.idx_LVK.dtype),
                            torch.zeros(len(layers), 1, k, dtype=self.weights_LVK.dtype))
            self._refresh_step_open()
        self._none_L = [False] * len(layers)
        self.skip_step = False  # the forward in flight is an all-learned one-row step (`begin_forward`)

    def _stack_pairs(self, pair_tier: dict[int, PairTable], scale_L1: torch.Tensor, device: torch.device,
                     index_dtype: torch.dtype) -> None:
        """All layers' pair entries in one sorted key tensor: slot * V**2 + prev * V + token (each
        layer's keys ascend and slots ascend, so the concatenation is sorted), with sets and weights
        scaled like the token entries' (no adaptive k: a pair row keeps its whole set)."""
        v2 = self.vocab * self.vocab
        parts = [(i, pair_tier[l]) for i, l in enumerate(self.layers) if l in pair_tier and pair_tier[l].size]
        self.has_pairs = bool(parts)  # decided once, on the host: without pair entries lookup() is unchanged
        if not parts:
            return
        self.pair_keys_X = torch.cat([p.keys_P.long() + i * v2 for i, p in parts]).to(device)
        self.pair_idx_XK = torch.cat([p.sets_PK for _, p in parts]).to(device, index_dtype)
        w_XK = torch.cat([p.weights_PK for _, p in parts]).to(device, torch.float32)
        mass_X = torch.cat([p.mass_P for _, p in parts]).to(device, torch.float32)
        scale_X1 = torch.cat([scale_L1[i].expand(p.size) for i, p in parts])[:, None]
        # routers whose weights do not sum to a constant use the raw mass, as for token entries
        self.pair_w_XK = torch.where(scale_X1.isnan(), w_XK * mass_X[:, None], w_XK * scale_X1)
        self.pair_offset_L = torch.arange(len(self.layers), device=device, dtype=torch.long) * v2
        self.pair_slot_X = self.pair_keys_X // v2
        self.pair_tok_X = self.pair_keys_X % self.vocab
        self.pair_tok_V = torch.zeros(self.vocab, dtype=torch.bool, device=device)
        self._refresh_pair_tokens()

    def _refresh_pair_tokens(self) -> None:
        """Tokens that end a pair entry that can serve (its layer has no token entry for the token):
        on CPU a forward with none skips the pair lookup. Entries whose token has a token entry never
        serve while it stands (most of layer 0's); a demotion may open them, so this is recomputed
        after each (tensor ops, no host sync)."""
        open_X = ~self.member_LV[self.pair_slot_X, self.pair_tok_X]
        self.pair_tok_V.zero_()
        self.pair_tok_V[self.pair_tok_X[open_X]] = True

    def _refresh_step_open(self) -> None:
        """The host list `_empty_step` reads (CPU stacks only; after construction and each demotion)."""
        open_V = self.member_LV.any(0) if self.config.enable_fast_path else torch.zeros_like(self.member_LV[0])
        if self.has_pairs and self.config.enable_fast_path:
            open_V = open_V | self.pair_tok_V
        self._step_open = open_V.tolist()

    def _empty_step(self, tok: Any) -> Lookup | None:
        """The lookup of a one-row CPU forward whose token can be served in no layer (most batch-1
        decode steps), without the ~20 tensor ops of the general path: the row goes to the learned
        router in every layer (all rows not fast, `any_L` all False), and counts one valid token on
        the host. None when the general path must run (another shape or device, a token that may be
        served, an id outside the vocabulary). Reading a CPU tensor is no device sync."""
        one = getattr(tok, "one", None)  # (id, valid, context) on the host: the tracker's one-row CPU step
        if self._step_open is None or one is None:
            return None
        tid, valid = one[0], one[1]
        if not 0 <= tid < self.vocab or self._step_open[tid]:
            return None
        look = _EmptyStep(tok, self._empty1, self._none_L)
        self.forwards += 1
        if self.config.track_performance and self.counts_fast_path:
            self.host_valid += int(valid)
        if self.counts_fast_path and self.on_rows is not None:
            self.on_rows(look.fast_LT, tok)
        self._last = look
        return look

    def begin_forward(self, tok: Any) -> None:
        """Called as each forward starts, while the routers are on (the tracker's `on_batch`): a
        one-row CPU step whose token no layer serves is resolved and counted here, once, and
        `skip_step` tells the routers to return their learned decision without further work."""
        self.skip_step = False
        if tok is not None and tok.one is not None and self._step_open is not None:
            self.apply_demotions()
            self.skip_step = self._empty_step(tok) is not None

    def valid_total(self) -> torch.Tensor:
        """Valid tokens counted at lookup time (device counter + the host part), a 0-d tensor."""
        return self.valid_tokens + self.host_valid

    def _may_pair(self, safe_T: torch.Tensor) -> bool:
        """False only where it is known for free that no token of this forward ends a pair entry: on
        CPU (reading a CPU tensor is no device sync; most decode steps have no such token). On
        accelerators always True, so the lookup never waits for the device."""
        return safe_T.device.type != "cpu" or bool(self.pair_tok_V[safe_T].any())

    def _pair_rows(self, tok: Any, device: torch.device, safe_T: torch.Tensor, open_LT: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pair_LT, entry_LT): rows served by a pair entry (only where `open_LT`: valid, in
        vocabulary, no token entry) and the entry's index. One searchsorted over (L, T); no host sync."""
        # -1 at a sequence start; a foreign id never hits
        hit_LT, entry_LT = find_pairs(self.pair_keys_X, tok.prev_T.to(device).long(), safe_T, self.vocab,
                                      self.pair_offset_L[:, None])
        return hit_LT & open_LT, entry_LT

    def counts(self) -> torch.Tensor:
        """(L, len(COUNTERS)) all counters, the lookup-time ones folded in (one new tensor)."""
        out = self.counts_LC.clone()
        out[:, C["fast"]] += self.fast_L
        out[:, C["learned"]] += self.valid_total() - self.fast_L
        out[:, C["forwards"]] += self.forwards
        out[:, C["fast_pair"]] += self.pair_L
        return out

    def reset_counts(self) -> None:
        self.counts_LC.zero_()
        self.fast_L.zero_()
        self.pair_L.zero_()
        self.valid_tokens.zero_()
        self.host_valid = 0
        self.forwards = 0

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
        if self._step_open is not None and bool(drop.any()):  # CPU only: no device to sync with
            self._refresh_step_open()

    def lookup(self, tok: Any, device: torch.device) -> Lookup:
        if self._last is not None and self._last.tokens is tok:
            return self._last
        self.apply_demotions()
        if device.type == "cpu" and (look := self._empty_step(tok)) is not None:
            return look
        ids_T, valid_T = tok.ids_T.to(device), tok.valid_T.to(device).bool()
        safe_T = ids_T.clamp(0, self.vocab - 1)  # out-of-vocabulary ids: a valid index, never fast
        ok_T = valid_T & (safe_T == ids_T)
        if self.config.enable_fast_path:
            fast_LT = self.member_LV[:, safe_T] & ok_T
        else:
            fast_LT = torch.zeros(len(self.layers), ids_T.shape[0], dtype=torch.bool, device=device)
        idx_LTK = self.idx_LVK[:, safe_T]
        # the pre-adaptive-k set is only read by verification and the cache
        nominal_LTK = idx_LTK if not self.config.adaptive_k else self.nominal_LVK[:, safe_T]
        w_LTK, token_LT, pair_LT = self.weights_LVK[:, safe_T], fast_LT, None
        if self.has_pairs and self.config.enable_fast_path and self._may_pair(safe_T):
            pair_LT, p_LT = self._pair_rows(tok, device, safe_T, ok_T & ~fast_LT)
            fast_LT = fast_LT | pair_LT
            idx_LTK = torch.where(pair_LT[..., None], self.pair_idx_XK[p_LT], idx_LTK)
            nominal_LTK = torch.where(pair_LT[..., None], self.pair_idx_XK[p_LT], nominal_LTK)
            w_LTK = torch.where(pair_LT[..., None], self.pair_w_XK[p_LT], w_LTK)
        any_L = fast_LT.any(1).tolist() if fast_LT.device.type == "cpu" else None
        look = Lookup(tok, safe_T, valid_T, fast_LT, nominal_LTK, idx_LTK, w_LTK, any_L, pair_LT)
        self.forwards += 1
        if self.config.track_performance and self.counts_fast_path:
            self.fast_L += fast_LT.sum(1)
            self.valid_tokens += valid_T.sum()
            if pair_LT is not None:
                self.pair_L += pair_LT.sum(1)
            if self.config.adaptive_k:
                self.counts_LC[:, C["adaptive_single"]] += (token_LT & self.single_LV[:, safe_T]).sum(1)
        if self.counts_fast_path and self.on_rows is not None:
            self.on_rows(fast_LT, tok)
        self._last = look
        return look


class VARRouter(nn.Module):
    def __init__(self, learned: nn.Module, layer: int, adapter: Any, config: VARConfig, table: LayerTable,
                 tokens: Callable[[], Any], on_tiers: Callable[[torch.Tensor, Any], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.learned = learned  # a submodule, so .to(device) moves it too
        self.layer, self.adapter, self.config = layer, adapter, config
        self.num_experts, self.top_k = adapter.num_experts, adapter.top_k
        self.tokens, self.on_tiers, self.clock = tokens, on_tiers, clock
        self.enabled = config.enable_var
        self._audit = False
        self.steps = 0
        param = next(learned.parameters())
        self.device = param.device
        self.vocab = int(table.member_V.shape[0])
        width = config.context_window_size + 1
        self.cache = ContextCache(config.cache_size if config.cache_enabled else 0, width, self.top_k, self.vocab,
                                  config.cache_ttl_steps, config.cache_ttl_seconds, param.device,
                                  min_confirmations=config.cache_min_confirmations)
        self.generator = torch.Generator(device=param.device).manual_seed(config.seed * 1000 + layer)
        self._probe(param)
        self.stack: TableStack | None = None
        self.audit = False
        self.slot = 0
        self._own = table  # until attach() is called (a router used on its own gets a one-layer stack)

    def attach(self, stack: TableStack) -> None:
        self.stack, self.slot = stack, stack.slot[self.layer]

    def _ensure_stack(self) -> TableStack:
        if self.stack is None:
            self.attach(TableStack({self.layer: self._own}, [self.layer], self.config, self.num_experts,
                                   {self.layer: self.weight_scale}, self.device, self.index_dtype))
        return self.stack

    # views of this layer's row of the stack (the seed-era attribute names)
    @property
    def member_V(self) -> torch.Tensor:
        stack = self._ensure_stack()
        stack.apply_demotions()
        return stack.member_LV[self.slot]

    @property
    def counts(self) -> torch.Tensor:
        """This layer's counters (a copy with the lookup-time counts folded in)."""
        return self._ensure_stack().counts()[self.slot]

    @torch.no_grad()
    def _probe(self, param: torch.Tensor) -> None:
        """Learn the router's output dtypes and whether its top-k weights sum to a constant."""
        hidden = param.shape[-1]
        x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
        logits, weights, indices = self.learned.forward(x)
        self.logits_dtype, self.weights_dtype, self.index_dtype = logits.dtype, weights.dtype, indices.dtype
        sums = weights.float().sum(-1)
        constant = bool((sums - sums[0]).abs().max() <= 1e-3 * sums[0].abs().clamp_min(1e-6))
        self.weight_scale = float(sums[0]) if constant else None  # None: use the table's raw mass

    def _restricted(self, logits_NE: torch.Tensor, idx_NK: torch.Tensor, mass_N: torch.Tensor | None = None) -> torch.Tensor:
        """Learned weights restricted to a chosen set (index E = empty slot gets 0)."""
        probs = self.adapter.probabilities(logits_NE)
        g = probs.gather(1, idx_NK.clamp_max(self.num_experts - 1)) * (idx_NK < self.num_experts)
        if self.weight_scale is None:
            return g
        return g / g.sum(1, keepdim=True).clamp_min(1e-20) * self.weight_scale

    def clear_cache(self) -> None:
        self.cache.clear()

    @property
    def audit(self) -> bool:
        return self._audit

    @audit.setter
    def audit(self, on: bool) -> None:
        self._audit = bool(on)
        # nothing but the table decision to make per row: a forward the stack resolved as all
        # learned (`TableStack.skip_step`) may return the learned decision straight away
        self._plain = self.cache.capacity == 0 and not self._audit and self.config.shadow_rate <= 0

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor):
        if not self.enabled:
            return self.learned.forward(hidden_states)
        if self._plain and self.stack is not None and self.stack.skip_step:
            return self.learned.forward(hidden_states)  # batch-1 decode step whose token no layer serves
        if not torch.is_grad_enabled():  # generate() and the server: no context to enter per layer
            return self._route(hidden_states)
        with torch.no_grad():
            return self._route(hidden_states)

    def _route(self, hidden_states: torch.Tensor):
        stack = self._ensure_stack()
        # Mixtral-style blocks already pass (T, H): no reshape op then
        h_TH = hidden_states if hidden_states.dim() == 2 else hidden_states.reshape(-1, hidden_states.shape[-1])
        t = h_TH.shape[0]
        l_logits, l_w, l_idx = self.learned.forward(h_TH)
        tok = self.tokens()
        if tok is None or tok.rows != t:  # no token ids (inputs_embeds): learned for all
            counts = stack.counts_LC[self.slot]
            counts[C["forwards"]] += 1  # this layer alone: no lookup ran
            counts[C["fallback_forwards"]] += 1
            counts[C["learned"]] += t
            return l_logits, l_w, l_idx
        look = stack.lookup(tok, h_TH.device)
        if (look.any_L is not None and not look.any_L[self.slot] and self.cache.capacity == 0
                and not (self.audit or self.config.shadow_rate > 0)):
            # no table row in this layer and nothing else to do (most batch-1 decode steps): the
            # learned decision as is, without the selects
            return l_logits, l_w, l_idx
        counts = stack.counts_LC[self.slot]
        fast_T = look.fast_LT[self.slot]
        nominal_TK = look.nominal_LTK[self.slot]
        idx_TK = torch.where(fast_T[:, None], look.idx_LTK[self.slot].to(l_idx.dtype), l_idx)
        w_TK = torch.where(fast_T[:, None], look.w_LTK[self.slot].to(l_w.dtype), l_w)
        routed_T = fast_T
        if self.cache.capacity > 0:
            idx_TK, w_TK, nominal_TK, routed_T = self._cached(look, tok, fast_T, idx_TK, w_TK, nominal_TK,
                                                              l_logits, l_idx, l_w, counts)
        if self.config.weights_source == "learned":
            w_TK = torch.where(routed_T[:, None], self._restricted(l_logits.reshape(t, -1).float(), idx_TK.long())
                               .to(l_w.dtype), w_TK)
        if self.audit or self.config.shadow_rate > 0:
            self._verify(look, fast_T, routed_T & ~fast_T, nominal_TK, l_idx, counts)
        return l_logits, w_TK, idx_TK

    def _cached(self, look: Lookup, tok: Any, fast_T, idx_TK, w_TK, nominal_TK, l_logits, l_idx, l_w, counts):
        """The context cache tier (host syncs inside the cache); also does this layer's counting."""
        self.steps += 1
        step, now = self.steps, self.clock()
        valid_T = look.valid_T
        full_TW = torch.cat([tok.context_TW.to(fast_T.device), tok.ids_T.to(fast_T.device)[:, None]], dim=1)
        ask_T = valid_T & ~fast_T
        hit_all, c_idx, c_w = self.cache.lookup(full_TW, step, now)
        hit_T = hit_all & ask_T
        counts[C["cache_lookups"]] += ask_T.sum()
        counts[C["cache_hits"]] += hit_T.sum()
        idx_TK = torch.where(hit_T[:, None], c_idx.to(idx_TK.dtype), idx_TK)
        w_TK = torch.where(hit_T[:, None], c_w.to(w_TK.dtype), w_TK)
        nominal_TK = torch.where(hit_T[:, None], c_idx.to(nominal_TK.dtype), nominal_TK)
        tier_T = torch.full_like(look.safe_T, LEARNED)
        tier_T = torch.where(fast_T, torch.full_like(tier_T, FAST), torch.where(hit_T, torch.full_like(tier_T, CACHED), tier_T))
        cand_T = valid_T & (tier_T == LEARNED)
        if cand_T.any():
            probs = self.adapter.probabilities(l_logits.reshape(-1, self.num_experts)[cand_T])
            ok = probs.max(1).values >= self.config.confidence_threshold
            if ok.any():
                rows = cand_T.nonzero().squeeze(1)[ok]
                self.cache.insert(full_TW[rows], l_idx[rows], l_w[rows].float(), step, now)
                counts[C["cache_inserts"]] += ok.sum()
        if self.config.track_performance:
            counts[:3] += torch.bincount(tier_T[valid_T], minlength=3)
            if self.config.adaptive_k:
                token_T = fast_T if look.pair_LT is None else fast_T & ~look.pair_LT[self.slot]
                counts[C["adaptive_single"]] += (token_T & self.stack.single_LV[self.slot][look.safe_T]).sum()
        if self.on_tiers is not None:
            self.on_tiers(tier_T, tok)
        return idx_TK, w_TK, nominal_TK, tier_T != LEARNED

    def _verify(self, look: Lookup, fast_T, cached_T, nominal_TK, learned_idx_TK, counts) -> None:
        """Audit counts and shadow checks, vectorised over all rows (the learned decision exists)."""
        exact_T, overlap_T = compare_sets(nominal_TK.long(), learned_idx_TK.long())
        if self.audit:
            for name, mask in (("fast", fast_T), ("cached", cached_T)):
                counts[C[f"audit_{name}_n"]] += mask.sum()
                counts[C[f"audit_{name}_exact"]] += (exact_T & mask).sum()
                counts[C[f"audit_{name}_overlap_x1000"]] += ((overlap_T * 1000).round().long() * mask).sum()
        if self.config.shadow_rate <= 0:
            return
        t = fast_T.shape[0]
        shadow_T = (fast_T | cached_T) & (torch.rand(t, generator=self.generator, device=fast_T.device) < self.config.shadow_rate)
        counts[C["shadow_agree"]] += (shadow_T & exact_T).sum()
        counts[C["shadow_disagree"]] += (shadow_T & ~exact_T).sum()
        s = self.stack
        token_T = fast_T if look.pair_LT is None else fast_T & ~look.pair_LT[self.slot]
        fs_T = (shadow_T & token_T).double()  # pair rows are not this token's evidence
        sa_V = s.shadow_agree_LV[self.slot].index_add_(0, look.safe_T, fs_T * exact_T.double())
        st_V = s.shadow_total_LV[self.slot].index_add_(0, look.safe_T, fs_T)
        cfg = self.config
        bound_V = wilson_lower_bound(s.agree_LV[self.slot] + sa_V, s.total_LV[self.slot] + st_V, cfg.wilson_z)
        checked_V = st_V > 0
        s.pending_LV[self.slot] |= checked_V & demote_mask(bound_V, sa_V, st_V, cfg.target_agreement, cfg.wilson_z,
                                                           cfg.shadow_min_checks)
        s.bound_LV[self.slot] = torch.where(checked_V, bound_V.to(s.bound_LV.dtype), s.bound_LV[self.slot])
