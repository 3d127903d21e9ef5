"""Phase 1 capture: router hooks, streaming per-(layer, token) statistics, pair statistics,
Parquet I/O, resumable and distributed capture jobs.

Modules: recorder (hooks), streaming_stats (StreamingTokenStats), pairs (PairStats), frame
(tensors <-> DataFrame), schema (Parquet files), analyzer (RouterAnalyzer), job (run_capture),
merge (merge_files), distributed (torchrun entry point). Tests: `pytest tests/test_capture_*.py`.
"""
