"""DeepSeek-V2 and V3: `layer.mlp.gate`, with shared experts (`mlp.shared_experts`, always run, never
routed) and the first layers dense (`first_k_dense_replace`).

V3 scores experts with a sigmoid; it chooses with `e_score_correction_bias` added to the scores
(selection only) inside the `topk_group` best of `n_group` groups (a group scores the sum of its two
best biased scores), and weighs the chosen experts by their unbiased sigmoid scores, renormalised
over the set when `norm_topk_prob`, times `routed_scaling_factor`. The adapter reports the sigmoid
scores normalised to a distribution as probabilities, while the top-k it reports is the router's own
(bias and group limits included). V2 takes top-k (greedy, or group-limited greedy) of a softmax and
multiplies the chosen probabilities by `routed_scaling_factor` without renormalising.
Test: `pytest tests/test_adapters.py tests/test_family_semantics.py -k deepseek`."""

import torch

from .base import MoEAdapter


class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    experts_key = "n_routed_experts"
    score_function = "sigmoid"
    shared_attrs = ("shared_experts",)

    @property
    def num_shared_experts(self) -> int:
        return int(getattr(self.config, "n_shared_experts", 0) or 0)

    @property
    def _factor(self) -> float:
        return float(getattr(self.config, "routed_scaling_factor", 1.0) or 1.0)

    @property
    def weight_scale(self) -> float | None:
        # renormalised sigmoid scores times the factor sum to the factor; raw ones to no constant
        return self._factor if getattr(self.config, "norm_topk_prob", False) else None

    def chosen_weights(self, scores_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        e = scores_TE.shape[-1]
        g = torch.sigmoid(scores_TE.float()).gather(1, idx_TK.long().clamp_max(e - 1)) * (idx_TK < e)
        if getattr(self.config, "norm_topk_prob", False):
            g = g / (g.sum(1, keepdim=True) + 1e-20)
        return g * self._factor


class DeepseekV2Adapter(MoEAdapter):
    family = "deepseek_v2"
    experts_key = "n_routed_experts"
    shared_attrs = ("shared_experts",)

    @property
    def num_shared_experts(self) -> int:
        return int(getattr(self.config, "n_shared_experts", 0) or 0)

    @property
    def weight_scale(self) -> float | None:
        return None  # softmax values of the chosen experts times the factor: no constant sum

    def chosen_weights(self, scores_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        factor = float(getattr(self.config, "routed_scaling_factor", 1.0) or 1.0)
        return super().chosen_weights(scores_TE, idx_TK) * factor
