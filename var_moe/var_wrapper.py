"""Seed-path shim: `from var_moe.var_wrapper import VARMixtralWrapper` (code in var_moe/var/wrapper.py)."""

from .var.wrapper import VARMixtralWrapper, VARModelWrapper  # noqa: F401
