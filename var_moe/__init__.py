"""var-moe: Verifiable Adaptive Routing for Mixture-of-Experts language models.

Public names are imported lazily so `import var_moe` stays cheap (no torch import until used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "get_adapter": "var_moe.adapters:get_adapter",
    "SUPPORTED_FAMILIES": "var_moe.adapters:SUPPORTED_FAMILIES",
    "load_model": "var_moe.loading:load_model",
    "LoadSpec": "var_moe.loading:LoadSpec",
    "REFERENCE_MODEL_DIR": "var_moe.loading:REFERENCE_MODEL_DIR",
    # Phase 1 (seed API names)
    "RouterAnalyzer": "var_moe.capture.analyzer:RouterAnalyzer",
    "StreamingTokenStats": "var_moe.capture.streaming_stats:StreamingTokenStats",
    # Phase 2 (seed API names)
    "VARConfig": "var_moe.var.config:VARConfig",
    "VARRouter": "var_moe.var.router:VARRouter",
    "VARModelWrapper": "var_moe.var.wrapper:VARModelWrapper",
    "VARMixtralWrapper": "var_moe.var.wrapper:VARMixtralWrapper",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'var_moe' has no attribute {name!r}")
    module, attr = _LAZY[name].split(":")
    return getattr(importlib.import_module(module), attr)


__all__ = sorted(_LAZY)
