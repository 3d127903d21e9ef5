"""OLMoE: `layer.mlp.gate`, softmax top-k over `num_experts`, no shared experts.
Test: `pytest tests/test_adapters.py -k olmoe`."""

from .base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    family = "olmoe"
    experts_key = "num_experts"
