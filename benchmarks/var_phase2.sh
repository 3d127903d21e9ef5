#!/usr/bin/env bash
# Phase 2 results on the reference model: calibration capture -> tables -> evaluations -> compare.
# Run from the repository root:  bash benchmarks/var_phase2.sh   (about 30 minutes on 2 CPU cores)
# Tables are built on the calibration split and every number is measured on the test split.
set -euo pipefail
OUT=results/phase2
N=${N:-128}          # test sequences per evaluation (256 tokens each)
THREADS=${THREADS:-1}
mkdir -p "$OUT/cache"
STATS=models/reference-moe/var/routing_stats_calibration.parquet  # committed: the server loads it by default
[ -f "$STATS" ] || varmoe capture --split calibration --threads "$THREADS" --output "$STATS" --no-progress  # whole split
python -m benchmarks.router_share --threads "$THREADS" --output "$OUT/router_share.json"
for p in conservative balanced aggressive; do
  varmoe build-tables --routing-stats "$STATS" --preset "$p" --evidence "$OUT/cache/evidence_calibration.safetensors" --threads "$THREADS" --output "$OUT/tables_$p.safetensors"
done
cp "$OUT/tables_balanced.safetensors" models/reference-moe/var/var_tables.safetensors
cp "$OUT/tables_balanced.json" models/reference-moe/var/var_tables.json
EV="varmoe evaluate --split test --num-samples $N --max-per-doc 1 --threads $THREADS --repeats 3"
$EV --mode baseline --output "$OUT/baseline.json"
for p in conservative balanced aggressive; do
  $EV --mode var --tables "$OUT/tables_$p.safetensors" --preset "$p" --output "$OUT/var_$p.json"
done
$EV --mode var --tables "$OUT/tables_balanced.safetensors" --preset balanced --weights-source learned --output "$OUT/var_balanced_learned_weights.json"
$EV --mode var --tables "$OUT/tables_balanced.safetensors" --preset balanced --adaptive-k --output "$OUT/var_balanced_adaptive_k.json"
$EV --mode var --tables "$OUT/tables_aggressive.safetensors" --preset aggressive --adaptive-k --adaptive-k-min-weight 0.8 --output "$OUT/var_aggressive_adaptive_k08.json"
$EV --mode var --tables "$OUT/tables_aggressive.safetensors" --preset aggressive --adaptive-k --adaptive-k-min-weight 0.7 --output "$OUT/var_aggressive_adaptive_k07.json"
$EV --mode var --tables "$OUT/tables_aggressive.safetensors" --preset aggressive --shadow-rate 0.1 --output "$OUT/var_aggressive_shadow.json"
for m in 0 5; do  # demotion by the running bound only (0), or by served agreement after 5 checks
  $EV --mode var --tables "$OUT/tables_aggressive.safetensors" --preset aggressive --shadow-rate 0.1 --shadow-min-checks $m --output "$OUT/var_aggressive_shadow_min_checks$m.json"
done
for f in conservative balanced aggressive balanced_learned_weights balanced_adaptive_k aggressive_adaptive_k08 aggressive_adaptive_k07 aggressive_shadow aggressive_shadow_min_checks0 aggressive_shadow_min_checks5; do
  varmoe compare "$OUT/baseline.json" "$OUT/var_$f.json" --json "$OUT/compare_$f.json" | tee "$OUT/compare_$f.txt"
done
python -m benchmarks.var_adaptive_k --threads "$THREADS" --output "$OUT/adaptive_k_timing.json"
python -m benchmarks.var_adaptive_k --threads "$THREADS" --experts-implementation eager --output "$OUT/adaptive_k_timing_eager.json"
python -m benchmarks.var_phase2_table $OUT/baseline.json $OUT/var_*.json | tee $OUT/summary.md
