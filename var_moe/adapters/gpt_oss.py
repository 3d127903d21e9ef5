"""GPT-OSS: `layer.mlp.router` with a bias; top-k on logits, weights a softmax over the chosen k.
Test: `pytest tests/test_adapters.py -k gpt_oss`."""

from .base import MoEAdapter


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    router_attr = "router"
