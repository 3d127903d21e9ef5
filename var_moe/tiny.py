"""Tiny seeded random MoE models, one per supported family, built from configs (no download).

`tiny_model("mixtral", seed=0)` returns a small eval-mode model (vocab 99, hidden 32, 2 layers,
4 experts, top-2) for tests, smoke runs and the random-init control. Test: `pytest tests/test_adapters.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InvalidInputError

_COMMON = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# family -> (config class name, family-specific fields)
_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, decoder_sparse_step=1),
    ),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1, head_dim=8)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4)),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
            num_hidden_layers=3, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
            num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, num_key_value_heads=4, topk_method="greedy", n_group=1, topk_group=1,
        ),
    ),
    "phimoe": ("PhimoeConfig", dict(num_local_experts=4)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4)),
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, head_dim=8, layer_types=None, sliding_window=16)),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def tiny_config(family: str, **overrides: Any) -> Any:
    import transformers

    if family not in _FAMILIES:
        raise InvalidInputError(f"unknown family {family!r}; tiny models exist for {', '.join(TINY_FAMILIES)}")
    cls_name, fields = _FAMILIES[family]
    kwargs = {**_COMMON, **fields, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return getattr(transformers, cls_name)(**kwargs)


def tiny_model(family: str = "mixtral", seed: int = 0, **overrides: Any) -> Any:
    """A seeded random causal LM of `family` in eval mode (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    if family == "deepseek_v3":
        # Give the bias-corrected choice something to do: a zero bias would make V3 look like V2.
        with torch.no_grad():
            for layer in model.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None and hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()
