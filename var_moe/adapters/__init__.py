"""Adapter registry: `get_adapter(model_or_config)` returns the adapter for a model's family.

Family modules are imported lazily by "module:Class" strings so that adding a family touches one
line here. An unknown `model_type` raises an error listing the supported families (with a
did-you-mean hint). Test: `pytest tests/test_adapters.py`.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from ..errors import InvalidInputError
from .base import MoEAdapter, MoELayer, RouterDecision, looks_like_probabilities

# model_type -> "module:Class" (relative to this package)
_REGISTRY: dict[str, str] = {
    "mixtral": "mixtral:MixtralAdapter",
    "qwen2_moe": "qwen_moe:Qwen2MoeAdapter",
    "qwen3_moe": "qwen_moe:Qwen3MoeAdapter",
    "olmoe": "olmoe:OlmoeAdapter",
    "deepseek_v2": "deepseek:DeepseekV2Adapter",
    "deepseek_v3": "deepseek:DeepseekV3Adapter",
    "phimoe": "phimoe:PhimoeAdapter",
    "granitemoe": "granitemoe:GraniteMoeAdapter",
    "gpt_oss": "gpt_oss:GptOssAdapter",
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(sorted(_REGISTRY))


class UnsupportedModelError(InvalidInputError):
    """Raised for a model whose architecture has no adapter."""


def get_adapter(model_or_config: Any) -> MoEAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        hint = difflib.get_close_matches(str(model_type), SUPPORTED_FAMILIES, n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported MoE family. Supported: {', '.join(SUPPORTED_FAMILIES)}.{extra}"
        )
    module_name, cls_name = _REGISTRY[model_type].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, cls_name)(config)


__all__ = [
    "MoEAdapter",
    "MoELayer",
    "RouterDecision",
    "SUPPORTED_FAMILIES",
    "UnsupportedModelError",
    "get_adapter",
    "looks_like_probabilities",
]
