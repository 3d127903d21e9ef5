"""Qwen2-MoE and Qwen3-MoE: `layer.mlp.gate` (softmax top-k over `num_experts`). Qwen2-MoE adds a
gated shared expert beside the routed ones; both may keep some layers dense (`mlp_only_layers`,
`decoder_sparse_step`), which `moe_layers` skips. Test: `pytest tests/test_adapters.py -k qwen`."""

from .base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    experts_key = "num_experts"

    @property
    def num_shared_experts(self) -> int:
        return 1 if getattr(self.config, "shared_expert_intermediate_size", 0) else 0


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    experts_key = "num_experts"
