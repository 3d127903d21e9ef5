"""Phase 1 capture: router hooks, streaming per-(layer, token) statistics, Parquet I/O."""
