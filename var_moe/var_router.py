"""Seed-path shim: `from var_moe.var_router import VARRouter` (the code lives in var_moe/var/router.py)."""

from .var.router import TIERS, VARRouter  # noqa: F401
