"""Phase 2: the VAR router (fast / learned tiers), verified tables, wrapper and evaluation (the
modules: docs/ARCHITECTURE.md). Imports are lazy so `import var_moe.var` stays cheap.
Test: `pytest tests/test_var_*.py`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "VARConfig": "config", "get_conservative_config": "config", "get_balanced_config": "config",
    "get_aggressive_config": "config", "get_preset": "config", "VARTables": "tables",
    "wilson_lower_bound": "certify", "VARRouter": "router",
    "VARModelWrapper": "wrapper", "VARMixtralWrapper": "wrapper", "Evidence": "evidence",
    "collect_evidence": "evidence",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'var_moe.var' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = sorted(_LAZY)
