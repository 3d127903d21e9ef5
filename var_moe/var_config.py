"""Seed-path shim: `from var_moe.var_config import VARConfig` (the code lives in var_moe/var/config.py)."""

from .var.config import (  # noqa: F401
                         PRESETS,
                         VARConfig,
                         get_aggressive_config,
                         get_balanced_config,
                         get_conservative_config,
                         get_preset,
)
