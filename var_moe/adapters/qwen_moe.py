"""Qwen2-MoE and Qwen3-MoE: `layer.mlp.gate` (softmax top-k over `num_experts`; the chosen
probabilities renormalised over the set only with `norm_topk_prob`). Qwen2-MoE adds a shared expert
beside the routed ones (`mlp.shared_expert`, always run, scaled per token by
sigmoid(`mlp.shared_expert_gate`), never routed); both may keep some layers dense (`mlp_only_layers`,
`decoder_sparse_step`), which `moe_layers` skips.
Test: `pytest tests/test_adapters.py tests/test_family_semantics.py -k qwen`."""

from .base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    experts_key = "num_experts"
    shared_attrs = ("shared_expert", "shared_expert_gate")

    @property
    def num_shared_experts(self) -> int:
        return 1 if getattr(self.config, "shared_expert_intermediate_size", 0) else 0

    @property
    def weight_scale(self) -> float | None:
        return self._norm_topk_scale()


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    experts_key = "num_experts"

    @property
    def weight_scale(self) -> float | None:
        return self._norm_topk_scale()
