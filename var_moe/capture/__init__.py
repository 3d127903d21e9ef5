"""Phase 1 capture: router hooks, streaming per-(layer, token) statistics, pair statistics,
Parquet I/O, resumable and distributed capture jobs.

Modules: recorder (hooks), streaming_stats (StreamingTokenStats, sparse), hash_index (HashIndex,
its key -> entry index), router_math (set codes, choices, Welford combination), dense_stats (the
dense reference form, tests and benchmark only), pairs (PairStats), frame (statistics <-> DataFrame), schema (Parquet files), analyzer (RouterAnalyzer), job (run_capture),
merge (merge_files), distributed (torchrun entry point). Tests: `pytest tests/test_capture_*.py`.
"""
