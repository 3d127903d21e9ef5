"""Seed import path: `from var_moe.streaming_stats import StreamingTokenStats` (lives in var_moe.capture)."""

from .capture.streaming_stats import StreamingTokenStats

__all__ = ["StreamingTokenStats"]
