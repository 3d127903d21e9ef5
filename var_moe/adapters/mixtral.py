"""Mixtral (and Mixtral-shaped models): `layer.mlp.gate` is a softmax top-k router over
`num_local_experts`; no shared experts. Test: `pytest tests/test_adapters.py -k mixtral`."""

from .base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
