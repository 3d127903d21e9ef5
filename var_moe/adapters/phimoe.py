"""Phi-MoE (Phi-3.5-MoE): the router is `layer.mlp.router`, an nn.Linear subclass whose top-2 choice
comes from sparsemixer (the second expert is picked after masking the first). Probabilities here are
the softmax of its logits. Test: `pytest tests/test_adapters.py -k phimoe`."""

from .base import MoEAdapter


class PhimoeAdapter(MoEAdapter):
    family = "phimoe"
    router_attr = "router"
