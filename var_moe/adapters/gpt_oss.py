"""GPT-OSS: `layer.mlp.router` with a bias (inside the logits it returns); top-k on logits, weights a
softmax over the chosen k (so they sum to 1, and equal the renormalised softmax probabilities of the
set: the base `weight_scale` and `chosen_weights`). No shared experts.
Test: `pytest tests/test_adapters.py tests/test_family_semantics.py -k gpt_oss`."""

from .base import MoEAdapter


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    router_attr = "router"
