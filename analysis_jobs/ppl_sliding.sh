#!/usr/bin/env bash
# The Phase 2 perplexity criterion on the reference model: the documents of the test split scored
# with sliding windows (256 tokens advancing by 128), baseline vs VAR paired on the same windows,
# with the paired bootstrap interval over documents; for the balanced tables and for deliberately
# loose ones (target 0.5, no per-document cap), which the 1% criterion must catch.
# Run from the repository root:  bash analysis_jobs/ppl_sliding.sh
# CPU time: ~7 min for the loose tables' evidence pass, then ~3 x 1.84M window tokens (baseline,
# balanced, loose); two shards run side by side and checkpoint, so a run cut short (TIMEOUT
# seconds) still reports every document it finished.
set -euo pipefail
OUT=results/phase2
THREADS=${THREADS:-1}
TIMEOUT=${TIMEOUT:-7200}
STATS=models/reference-moe/var/routing_stats_calibration.parquet
mkdir -p "$OUT/cache" runs/ppl
# loose tables: the sweep's loose point (t0.5-f5-eNone-cNone-bh)
[ -f "$OUT/tables_loose.safetensors" ] || varmoe build-tables --threads "$THREADS" --routing-stats "$STATS" \
  --preset balanced --target-agreement 0.5 --frequency-threshold 5 --max-per-document none \
  --evidence "$OUT/cache/evidence_calibration.safetensors" --output "$OUT/tables_loose.safetensors"
for s in 0 1; do
  timeout "$TIMEOUT" python -m analysis_jobs.ppl_sliding --threads "$THREADS" --shard $s/2 --output runs/ppl/shard$s.json \
    --tables balanced=models/reference-moe/var/var_tables.safetensors --tables loose="$OUT/tables_loose.safetensors" &
done
wait || true  # a shard cut by the timeout keeps its checkpoint
python -m analysis_jobs.ppl_sliding --merge runs/ppl/shard0.json runs/ppl/shard1.json --output "$OUT/ppl_sliding.json"
