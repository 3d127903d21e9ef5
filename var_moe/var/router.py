"""`VARRouter`: drop-in replacement of one MoE layer's router with two tiers per token.

Each row (token) of the (T, H) hidden states is *fast* where a table serves it (`served.decide`),
*learned* otherwise (padding and unknown token ids included). It returns the transformers v5 router
contract `(router_logits, weights, indices)`, so the experts run untouched. The fast tier comes from
the shared `TableStack` (stack.py); the router runs the learned router on all rows (a subset would
need its size on the host) and selects rows with `torch.where`: no boolean-mask indexing, no host
synchronisation, and an empty table returns the learned outputs bit for bit.

Weights (`weights_source`): "table" serves the table's weights scaled the way the family's router
scales its own (`adapter.weight_scale`; a probe at construction checks the router agrees);
"learned" gives the chosen set the weights the family's router would (`adapter.chosen_weights`).
router_logits are always the learned router's. Adaptive k (one expert where the table's top weight
>= `adaptive_k_min_weight`) is precomputed in the stack. Shadow verification compares a seeded
sample of fast rows with the learned decision and queues demotions (`certify.demote_mask`), applied
between forwards and never while the tables are frozen (`VARModelWrapper.frozen_tables()`); a pair
row's check counts towards the agreement counters only, never towards its token's evidence (pair
entries are not demoted in service). Audit mode counts the agreement of every fast row without
demoting.

Shapes: T tokens, H hidden, E experts, K top-k, V vocabulary, L layers.
Test: `pytest tests/test_var_router.py tests/test_var_exact.py`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .certify import demote_mask, wilson_lower_bound
from .config import VARConfig
from .served import Lookup
from .stack import C, TableStack


def compare_sets(a_TK: torch.Tensor, b_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact_T, overlap_T): identical top-k sets, and |a & b| / K."""
    exact = (a_TK.sort(1).values == b_TK.sort(1).values).all(1)
    overlap = (a_TK[:, :, None] == b_TK[:, None, :]).any(2).sum(1).float() / a_TK.shape[1]
    return exact, overlap


class VARRouter(nn.Module):
    """One layer's router; `attach` hands it the wrapper's shared `TableStack` before it routes."""

    def __init__(self, learned: nn.Module, layer: int, adapter: Any, config: VARConfig, tokens: Callable[[], Any]):
        super().__init__()
        self.learned = learned  # a submodule, so .to(device) moves it too
        self.layer, self.adapter, self.config = layer, adapter, config
        self.tokens = tokens
        self.enabled = config.enable_var
        param = next(learned.parameters())
        self.device = param.device
        self.generator = torch.Generator(device=param.device).manual_seed(config.seed * 1000 + layer)
        self._probe(param)
        self.stack: TableStack | None = None
        self.audit = False
        self.slot = 0
        # called with each forward's outputs when set (var_moe/routing_tap.py): the tap files them
        # without a forward hook, sparing each layer of every step a hook dispatch
        self.output_sink: Callable[[tuple], None] | None = None

    def attach(self, stack: TableStack) -> None:
        self.stack, self.slot = stack, stack.slot[self.layer]

    @torch.no_grad()
    def _probe(self, param: torch.Tensor) -> None:
        """Learn the router's index dtype; take the weight scale from the adapter and check that the
        router's top-k weights do sum to it (an adapter that misreads its family's router would
        otherwise serve table weights on another scale than the learned rows', silently)."""
        hidden = param.shape[-1]
        x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
        out = self.learned.forward(x)
        if out[2].is_floating_point():  # e.g. GraniteMoE in transformers < 5.20: (indices, weights, logits)
            raise RuntimeError(
                f"the {self.adapter.family} router returns (indices, weights, logits) in this transformers version; "
                "VAR's router keeps the v5 contract (router_logits, weights, indices): use transformers >= 5.20")
        _, weights, indices = out
        self.index_dtype = indices.dtype
        self.weight_scale = self.adapter.weight_scale  # None: use the table's raw mass
        if self.weight_scale is not None:
            sums = weights.float().reshape(x.shape[0], -1).sum(-1)
            # the weights' own dtype rounds each of K terms (bf16: 2**-8 relative)
            tol = max(1e-4, 4 * torch.finfo(weights.dtype).eps) * abs(self.weight_scale)
            if bool((sums - self.weight_scale).abs().max() > tol):
                raise RuntimeError(
                    f"the {self.adapter.family} adapter says layer {self.layer}'s top-k weights sum to "
                    f"{self.weight_scale}, but the router's sum to {sums.min().item():.6g}..{sums.max().item():.6g}")

    @property
    def audit(self) -> bool:
        return self._audit

    @audit.setter
    def audit(self, on: bool) -> None:
        self._audit = bool(on)
        # nothing but the table decision to make per row: a one-row step the stack decided on the
        # host (`TableStack.step_rows`) may return its row, or the learned decision, straight away
        self._plain = not self._audit and self.config.shadow_rate <= 0

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor):
        out = self._decide(hidden_states)
        if self.output_sink is not None:
            self.output_sink(out)
        return out

    def _decide(self, hidden_states: torch.Tensor):
        if not self.enabled:
            return self.learned.forward(hidden_states)
        rows = self.stack.step_rows if self._plain else None
        if rows is not None:  # a one-row CPU step decided on the host as it started (one_row.py)
            out = self.learned.forward(hidden_states)
            row = rows[self.slot]
            if row is None:
                return out
            idx, w = row
            return (out[0], w if w.dtype == out[1].dtype else w.to(out[1].dtype),
                    idx if idx.dtype == out[2].dtype else idx.to(out[2].dtype))
        if not torch.is_grad_enabled():  # generate() and the server: no context to enter per layer
            return self._route(hidden_states)
        with torch.no_grad():
            return self._route(hidden_states)

    def _route(self, hidden_states: torch.Tensor):
        stack = self.stack
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
        if self._plain and look.any_L is not None and not look.any_L[self.slot]:
            # no table row in this layer and nothing else to do: the learned decision as is, without
            # the selects
            return l_logits, l_w, l_idx
        counts = stack.counts_LC[self.slot]
        fast_T = look.fast_LT[self.slot]
        nominal_TK = look.nominal_LTK[self.slot]
        idx_TK = torch.where(fast_T[:, None], look.idx_LTK[self.slot].to(l_idx.dtype), l_idx)
        w_TK = torch.where(fast_T[:, None], look.w_LTK[self.slot].to(l_w.dtype), l_w)
        if self.config.weights_source == "learned":
            w_TK = torch.where(fast_T[:, None], self.adapter.chosen_weights(l_logits.reshape(t, -1), idx_TK)
                               .to(l_w.dtype), w_TK)
        if self.audit or self.config.shadow_rate > 0:
            self._verify(look, fast_T, nominal_TK, l_idx, counts)
        return l_logits, w_TK, idx_TK

    def _verify(self, look: Lookup, fast_T, nominal_TK, learned_idx_TK, counts) -> None:
        """Audit counts and shadow checks, vectorised over all rows (the learned decision exists)."""
        exact_T, overlap_T = compare_sets(nominal_TK.long(), learned_idx_TK.long())
        if self.audit:
            counts[C["audit_fast_n"]] += fast_T.sum()
            counts[C["audit_fast_exact"]] += (exact_T & fast_T).sum()
            counts[C["audit_fast_overlap_x1000"]] += ((overlap_T * 1000).round().long() * fast_T).sum()
        if self.config.shadow_rate <= 0:
            return
        t = fast_T.shape[0]
        shadow_T = fast_T & (torch.rand(t, generator=self.generator, device=fast_T.device) < self.config.shadow_rate)
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
