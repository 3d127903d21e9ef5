"""OLMoE: `layer.mlp.gate`, softmax top-k over `num_experts` (renormalised over the set only with
`norm_topk_prob`), no shared experts. Test: `pytest tests/test_adapters.py tests/test_family_semantics.py -k olmoe`."""

from .base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    family = "olmoe"
    experts_key = "num_experts"

    @property
    def weight_scale(self) -> float | None:
        return self._norm_topk_scale()
