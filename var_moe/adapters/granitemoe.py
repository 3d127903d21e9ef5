"""GraniteMoE: the block lives at `layer.block_sparse_moe` and its router at `.router`; top-k is
taken on logits and the weights are a softmax over the chosen k. Test: `pytest tests/test_adapters.py -k granite`."""

from .base import MoEAdapter


class GraniteMoeAdapter(MoEAdapter):
    family = "granitemoe"
    block_attrs = ("block_sparse_moe", "mlp")
    router_attr = "router"
