"""DeepSeek-V2 and V3: `layer.mlp.gate`, with shared experts and the first layers dense
(`first_k_dense_replace`). V3 scores experts with a sigmoid and picks top-k with a bias term and
group limits; the adapter reports the sigmoid scores normalised to a distribution, while the
top-k it reports is the router's own (bias included). Test: `pytest tests/test_adapters.py -k deepseek`."""

from .base import MoEAdapter


class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    experts_key = "n_routed_experts"
    score_function = "sigmoid"

    @property
    def num_shared_experts(self) -> int:
        return int(getattr(self.config, "n_shared_experts", 0) or 0)


class DeepseekV2Adapter(MoEAdapter):
    family = "deepseek_v2"
    experts_key = "n_routed_experts"

    @property
    def num_shared_experts(self) -> int:
        return int(getattr(self.config, "n_shared_experts", 0) or 0)
