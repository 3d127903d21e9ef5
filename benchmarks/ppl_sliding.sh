#!/usr/bin/env bash
# The Phase 2 perplexity criterion on the reference model: every document of the test split scored
# with sliding windows (256 tokens advancing by 128), baseline vs VAR paired in one process, with
# the paired bootstrap interval over documents; for the balanced tables and for deliberately loose
# ones (target 0.5, no per-document cap), which the 1% criterion must catch.
# Run from the repository root:  bash benchmarks/ppl_sliding.sh   (about 35 minutes on 1 CPU thread;
# the two evaluations are independent and may run side by side)
set -euo pipefail
OUT=results/phase2
THREADS=${THREADS:-1}
STATS=models/reference-moe/var/routing_stats_calibration.parquet
mkdir -p "$OUT/cache"
# loose tables: the sweep's loose point (t0.5-f5-eNone-cNone-bh); the evidence pass is ~7 minutes
varmoe build-tables --threads "$THREADS" --routing-stats "$STATS" --preset balanced --target-agreement 0.5 \
  --frequency-threshold 5 --max-per-document none --evidence "$OUT/cache/evidence_calibration.safetensors" \
  --output "$OUT/tables_loose.safetensors"
EV="varmoe evaluate --threads $THREADS --mode var --split test --max-length 256 --stride 128 --batch-size 16 --timing-batches 8 --repeats 3"
$EV --tables models/reference-moe/var/var_tables.safetensors --preset balanced --output "$OUT/ppl_sliding_balanced.json"
$EV --tables "$OUT/tables_loose.safetensors" --preset balanced --target-agreement 0.5 --frequency-threshold 5 \
  --max-per-document none --output "$OUT/ppl_sliding_loose.json"
