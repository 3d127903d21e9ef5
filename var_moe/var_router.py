"""Seed-path shim: `from var_moe.var_router import VARRouter` (the code lives in var_moe/var/router.py)."""

from .var.router import VARRouter  # noqa: F401
from .var.stack import TIERS  # noqa: F401
