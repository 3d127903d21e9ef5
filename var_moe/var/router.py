"""`VARRouter`: drop-in replacement of one MoE layer's router with three tiers per token.

For each row (token) of the (T, H) hidden states, vectorised over the batch:
  fast    - the token is in this layer's verified table: use the table's expert set,
  cached  - else the (last W tokens, token) key is in this layer's context cache: repeat that
            learned decision,
  learned - else (and for padding, and when token ids are unknown): the original router.
It returns the transformers v5 router contract `(router_logits, weights, indices)`, so the
experts run untouched. The original router is called through `.forward` (not `__call__`) so
hooks on it never see partial batches; when every row is learned it is called on the whole batch
unchanged, so an empty table reproduces the original routing bit for bit.

Weights (`weights_source`): "table" uses the table's stored weights (cached rows: the cached
learned weights); "learned" runs the router on those rows and restricts its probabilities to the
chosen set, renormalised the way the router normalises (a probe at construction measures whether
its top-k weights sum to a constant, e.g. 1 for Mixtral, routed_scaling_factor for DeepSeek-V3).
router_logits of fast/cached rows whose learned scores were not computed are synthetic: the
chosen set's weight distribution (floor 1e-6 elsewhere) as log-probabilities (softmax routers) or
logits (sigmoid routers), so the adapter reads back the distribution actually used.

Adaptive k: fast rows whose table gives the top expert >= `adaptive_k_min_weight` of the set's
weight go to that expert alone with the full weight; the other slots hold index E (the experts'
empty slot) with weight 0. Shadow verification re-runs the learned router on a seeded sample of
fast/cached rows, counts agreement (exact top-k set) and demotes table entries whose Wilson lower
bound over calibration + shadow evidence drops below target, or whose shadow checks alone (at least
`shadow_min_checks`) put the upper bound below target (`tables.demote_mask`). Audit mode
(evaluation) checks every fast/cached row without demoting.

Shapes: T tokens, H hidden, E experts, K top-k, V vocabulary, W context window.
Test: `pytest tests/test_var_router.py tests/test_var_exact.py`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from .cache import ContextCache
from .config import VARConfig
from .tables import LayerTable, demote_mask, wilson_lower_bound

FAST, CACHED, LEARNED = 0, 1, 2
TIERS = ("fast", "cached", "learned")
# counters kept per router in one int64 tensor (no host sync per forward)
COUNTERS = ("fast", "cached", "learned", "cache_lookups", "cache_hits", "cache_inserts", "shadow_agree",
            "shadow_disagree", "demoted", "fallback_forwards", "audit_fast_n", "audit_fast_exact",
            "audit_fast_overlap_x1000", "audit_cached_n", "audit_cached_exact", "audit_cached_overlap_x1000",
            "adaptive_single", "forwards")
C = {name: i for i, name in enumerate(COUNTERS)}


def compare_sets(a_TK: torch.Tensor, b_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact_T, overlap_T): identical top-k sets, and |a & b| / K."""
    exact = (a_TK.sort(1).values == b_TK.sort(1).values).all(1)
    overlap = (a_TK[:, :, None] == b_TK[:, None, :]).any(2).sum(1).float() / a_TK.shape[1]
    return exact, overlap


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
        self.audit = False
        self.steps = 0
        param = next(learned.parameters())
        for name in LayerTable.NAMES:
            self.register_buffer(name, getattr(table, name).clone().to(param.device), persistent=False)
        self.vocab = int(self.member_V.shape[0])
        self.register_buffer("shadow_agree_V", torch.zeros(self.vocab, dtype=torch.float64, device=param.device), persistent=False)
        self.register_buffer("shadow_total_V", torch.zeros(self.vocab, dtype=torch.float64, device=param.device), persistent=False)
        self.register_buffer("counts", torch.zeros(len(COUNTERS), dtype=torch.long, device=param.device), persistent=False)
        self.single_V = self.weights_VK[:, 0] >= config.adaptive_k_min_weight
        width = config.context_window_size + 1
        self.cache = ContextCache(config.cache_size if config.cache_enabled else 0, width, self.top_k, self.vocab,
                                  config.cache_ttl_steps, config.cache_ttl_seconds, param.device,
                                  min_confirmations=config.cache_min_confirmations)
        self.generator = torch.Generator(device=param.device).manual_seed(config.seed * 1000 + layer)
        self._probe(param)

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

    # -- helpers -----------------------------------------------------------------------------------
    def _scale(self, w_NK: torch.Tensor, mass_N: torch.Tensor) -> torch.Tensor:
        return w_NK * (self.weight_scale if self.weight_scale is not None else mass_N[:, None])

    def _restricted(self, logits_NE: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Learned weights restricted to a chosen set (index E = empty slot gets 0)."""
        probs = self.adapter.probabilities(logits_NE)
        g = probs.gather(1, idx_NK.clamp_max(self.num_experts - 1)) * (idx_NK < self.num_experts)
        if self.weight_scale is None:
            return g
        return g / g.sum(1, keepdim=True).clamp_min(1e-20) * self.weight_scale

    def _synthetic_logits(self, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        p = torch.full((idx_NK.shape[0], self.num_experts + 1), 1e-6, device=idx_NK.device)
        w = w_NK.float().clamp_min(0)
        p.scatter_add_(1, idx_NK.long(), w / w.sum(1, keepdim=True).clamp_min(1e-20))
        p = p[:, : self.num_experts]
        p = p / p.sum(1, keepdim=True)
        out = torch.logit(p) if self.adapter.score_function == "sigmoid" else p.log()
        return out.to(self.logits_dtype)

    def _count(self, name: str, value: Any) -> None:
        if self.config.track_performance:
            self.counts[C[name]] += value

    def clear_cache(self) -> None:
        self.cache.clear()

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor):
        if not self.enabled:
            return self.learned.forward(hidden_states)
        with torch.no_grad():
            return self._route(hidden_states)

    def _route(self, hidden_states: torch.Tensor):
        h_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        t = h_TH.shape[0]
        self.steps += 1
        self._count("forwards", 1)
        step, now = self.steps, self.clock()
        tok = self.tokens()
        if tok is None or tok.ids_T.shape[0] != t:  # no token ids (inputs_embeds): learned for all
            out = self.learned.forward(h_TH)
            self._count("fallback_forwards", 1)
            self._count("learned", t)
            return out
        dev = h_TH.device
        ids_T = tok.ids_T.to(dev)
        valid_T = tok.valid_T.to(dev)
        in_vocab_T = (ids_T >= 0) & (ids_T < self.vocab)
        safe_T = torch.where(in_vocab_T, ids_T, torch.zeros_like(ids_T))
        tier_T = torch.full((t,), LEARNED, dtype=torch.long, device=dev)
        fast_T = valid_T & in_vocab_T & self.member_V[safe_T] if self.config.enable_fast_path else torch.zeros_like(valid_T)
        tier_T[fast_T] = FAST
        full_TW = None
        hit_T = torch.zeros_like(fast_T)
        if self.cache.capacity > 0:
            full_TW = torch.cat([tok.context_TW.to(dev), ids_T[:, None]], dim=1)
            ask_T = valid_T & ~fast_T
            hit_all, c_idx, c_w = self.cache.lookup(full_TW, step, now)
            hit_T = hit_all & ask_T
            tier_T[hit_T] = CACHED
            self._count("cache_lookups", ask_T.sum())
            self._count("cache_hits", hit_T.sum())

        routed_T = tier_T != LEARNED
        # rows that need the learned router: learned tier, shadow sample, audit, learned weights
        need_T = ~routed_T
        shadow_T = torch.zeros_like(routed_T)
        if self.config.shadow_rate > 0:
            shadow_T = routed_T & (torch.rand(t, generator=self.generator, device=dev) < self.config.shadow_rate)
        if self.audit or self.config.weights_source == "learned":
            need_T = torch.ones_like(need_T)
        need_T = need_T | shadow_T

        n_need = int(need_T.sum())
        if n_need == t:
            l_logits, l_w, l_idx = self.learned.forward(h_TH)
            rows = None
        elif n_need > 0:
            rows = need_T.nonzero().squeeze(1)
            l_logits, l_w, l_idx = self.learned.forward(h_TH[rows])
        if n_need == t and not bool(routed_T.any()):
            self._after(tier_T, valid_T, full_TW, l_logits, l_w, l_idx, step, now, tok)
            return l_logits, l_w, l_idx  # all learned: exactly the original router's output

        k, e = self.top_k, self.num_experts
        logits_dtype = l_logits.dtype if n_need else self.logits_dtype
        weights_dtype = l_w.dtype if n_need else self.weights_dtype
        # assembled with gathers over all T rows and `where` (no boolean-mask indexing, no host syncs)
        idx_TK = self.experts_VK[safe_T].to(self.index_dtype)
        w_TK = self._scale(self.weights_VK[safe_T], self.mass_V[safe_T])
        if self.cache.capacity > 0:
            idx_TK = torch.where(hit_T[:, None], c_idx.to(self.index_dtype), idx_TK)
            w_TK = torch.where(hit_T[:, None], c_w, w_TK)
        nominal_TK = idx_TK  # the table / cache set before adaptive k (for verification)
        if self.config.adaptive_k:
            single_T = fast_T & self.single_V[safe_T]
            slot0 = torch.arange(k, device=dev) == 0
            idx_TK = torch.where(single_T[:, None] & ~slot0, torch.full_like(idx_TK, e), idx_TK)  # experts skip index E
            w_TK = torch.where(single_T[:, None], torch.where(slot0, w_TK.sum(1, keepdim=True), 0.0), w_TK)
            self._count("adaptive_single", single_T.sum())

        lrn_T = ~routed_T
        if n_need:
            if rows is None:
                learned_idx_TK, full_w, logits_TE = l_idx, l_w.float(), l_logits.reshape(t, e)
            else:
                learned_idx_TK = torch.zeros(t, k, dtype=self.index_dtype, device=dev).index_copy_(0, rows, l_idx)
                full_w = torch.zeros(t, k, dtype=torch.float32, device=dev).index_copy_(0, rows, l_w.float())
                logits_TE = torch.zeros(t, e, dtype=logits_dtype, device=dev).index_copy_(0, rows, l_logits.reshape(-1, e))
            idx_TK = torch.where(lrn_T[:, None], learned_idx_TK, idx_TK)
            w_TK = torch.where(lrn_T[:, None], full_w, w_TK)
            if self.config.weights_source == "learned":
                w_TK = torch.where(routed_T[:, None], self._restricted(logits_TE.float(), idx_TK.long()), w_TK)
            self._verify(fast_T, hit_T, need_T, nominal_TK, learned_idx_TK, shadow_T, safe_T)
        else:
            logits_TE = torch.empty(t, e, dtype=logits_dtype, device=dev)
        not_computed = routed_T & ~need_T
        if not_computed.any():
            logits_TE[not_computed] = self._synthetic_logits(idx_TK[not_computed], w_TK[not_computed])
        w_TK = w_TK.to(weights_dtype)
        self._after(tier_T, valid_T, full_TW, logits_TE, w_TK, idx_TK, step, now, tok, fresh_T=need_T & ~routed_T)
        return logits_TE, w_TK, idx_TK

    def _verify(self, fast_T, hit_T, need_T, nominal_TK, learned_idx_TK, shadow_T, safe_T) -> None:
        """Shadow verification (with demotion) and audit counts, on rows whose learned decision exists."""
        if self.audit:
            for name, mask in (("fast", fast_T), ("cached", hit_T)):
                if mask.any():
                    exact, overlap = compare_sets(nominal_TK[mask], learned_idx_TK[mask])
                    self._count(f"audit_{name}_n", mask.sum())
                    self._count(f"audit_{name}_exact", exact.sum())
                    self._count(f"audit_{name}_overlap_x1000", (overlap * 1000).round().long().sum())
        if not shadow_T.any():
            return
        exact, _ = compare_sets(nominal_TK[shadow_T], learned_idx_TK[shadow_T])
        self._count("shadow_agree", exact.sum())
        self._count("shadow_disagree", (~exact).sum())
        fs = fast_T[shadow_T]
        if fs.any():  # running evidence of table entries: calibration counts + shadow checks
            ids = safe_T[shadow_T][fs]
            self.shadow_total_V.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
            self.shadow_agree_V.index_add_(0, ids, exact[fs].double())
            bound = wilson_lower_bound(self.agree_V[ids] + self.shadow_agree_V[ids],
                                       self.total_V[ids] + self.shadow_total_V[ids], self.config.wilson_z)
            demote = demote_mask(bound, self.shadow_agree_V[ids], self.shadow_total_V[ids], self.config.target_agreement,
                                 self.config.wilson_z, self.config.shadow_min_checks)
            drop = ids[demote & self.member_V[ids]].unique()
            if drop.numel():
                self.member_V[drop] = False
                self._count("demoted", drop.numel())
            self.bound_V[ids] = bound.float()

    def _after(self, tier_T, valid_T, full_TW, logits_TE, w_TK, idx_TK, step, now, tok, fresh_T=None) -> None:
        """Fill the cache with confident learned decisions; count tiers of valid tokens."""
        if self.cache.capacity > 0 and full_TW is not None:
            cand_T = valid_T & (tier_T == LEARNED) & (fresh_T if fresh_T is not None else torch.ones_like(valid_T))
            if cand_T.any():
                probs = self.adapter.probabilities(logits_TE[cand_T].reshape(-1, self.num_experts))
                ok = probs.max(1).values >= self.config.confidence_threshold
                if ok.any():
                    rows = cand_T.nonzero().squeeze(1)[ok]
                    self.cache.insert(full_TW[rows], idx_TK[rows], w_TK[rows].float(), step, now)
                    self._count("cache_inserts", ok.sum())
        if self.config.track_performance:
            counts = torch.bincount(tier_T[valid_T], minlength=3)
            self.counts[:3] += counts
        if self.on_tiers is not None:
            self.on_tiers(tier_T, tok)
