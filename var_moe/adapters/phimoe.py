"""Phi-MoE (Phi-3.5-MoE): the router is `layer.mlp.router`, an nn.Linear subclass whose top-2 choice
comes from sparsemixer (eval mode: the largest logit first, then the largest after masking it).
Probabilities here are the softmax of its logits. Each chosen expert's weight is a softmax over the
logits not masked away for it: the experts whose logit lies within a relative `2 * router_jitter_noise`
of that choice's own logit (the first choice already masked out for the second), so the weights
sum to no constant and served table weights keep their raw mass (`weight_scale` None).
Test: `pytest tests/test_adapters.py tests/test_family_semantics.py -k phimoe`."""

import torch

from .base import MoEAdapter


class PhimoeAdapter(MoEAdapter):
    family = "phimoe"
    router_attr = "router"

    @property
    def weight_scale(self) -> float | None:
        return None

    def chosen_weights(self, scores_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        """Sparsemixer's eval-mode multipliers, with the set's experts taken as the choices in
        descending logit order (for the router's own choice: exactly its weights)."""
        s = scores_TE.float()
        e, eps = s.shape[-1], float(getattr(self.config, "router_jitter_noise", 0.0) or 0.0)
        valid = idx_TK < e
        i = idx_TK.long().clamp_max(e - 1)
        order = s.gather(1, i).masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)
        picks = i.gather(1, order)
        masked, out = s, []
        for j in range(picks.shape[1]):  # a loop over set positions, not rows
            pick = picks[:, j:j + 1]
            top = s.gather(1, pick)
            far = ((top - s) / s.abs().clamp(min=top)) > 2 * eps
            out.append(torch.softmax(masked.masked_fill(far, float("-inf")), -1).gather(1, pick))
            masked = masked.scatter(1, pick, float("-inf"))
        w = torch.zeros_like(s[:, : picks.shape[1]]).scatter(1, order, torch.cat(out, 1))
        return w * valid
