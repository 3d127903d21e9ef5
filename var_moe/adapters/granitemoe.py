"""GraniteMoE: the block lives at `layer.block_sparse_moe` and its router at `.router`; top-k is
taken on logits and the weights are a softmax over the chosen k. transformers before 5.20 (the
vLLM environment's) has its router return `(top_k_index, top_k_weights, router_logits)`, the
reverse of the v5 contract: capture reads either order (the index is the integer tensor); the
builtin VAR router refuses that version with a message (var/router.py), vLLM's own GraniteMoE is unaffected.
Test: `pytest tests/test_adapters.py -k granite`."""

from .base import MoEAdapter, RouterDecision


class GraniteMoeAdapter(MoEAdapter):
    family = "granitemoe"
    block_attrs = ("block_sparse_moe", "mlp")
    router_attr = "router"

    def decision(self, router_output: tuple) -> RouterDecision:
        if isinstance(router_output, tuple) and len(router_output) == 3 and not router_output[0].is_floating_point():
            router_output = tuple(reversed(router_output))
        return super().decision(router_output)
