"""Expert prediction and offloading: routing traces, expert predictors, an expert-cache simulator
with hardware profiles, and the comparison with Mixtral-offloading's published speeds.

Commands: `varmoe trace`, `varmoe simulate`; guide: docs/OFFLOAD.md. Tests: `pytest tests/test_offload_*.py`.
"""
