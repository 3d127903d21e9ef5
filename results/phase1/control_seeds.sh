#!/usr/bin/env bash
# Is the trained-vs-control margin a property of one random initialisation? Re-runs the held-out
# predictability with random-init controls of other seeds (their own calibration tables), same
# trained model, splits and sizes as run.sh. Run from the repository root:
#     bash results/phase1/control_seeds.sh        # SEEDS / N / LEN / OUT may be overridden
# Needs $OUT/stats_calibration.parquet (the trained model's calibration capture, from run.sh).
# Writes $OUT/heldout_control_seed<S>.json; the controls' calibration captures go to a temporary folder.
set -euo pipefail
MODEL=${MODEL:-models/reference-moe}
N=${N:-1500}
LEN=${LEN:-256}
OUT=${OUT:-results/phase1}
SEEDS=${SEEDS:-1 2}
THREADS=${THREADS:-1}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
common=(--model "$MODEL" --num-samples "$N" --max-length "$LEN" --threads "$THREADS")
for seed in $SEEDS; do
  varmoe capture "${common[@]}" --split calibration --control random-init --seed "$seed" \
    --output "$TMP/stats_calibration_control_$seed.parquet" --no-progress
  varmoe predictability "${common[@]}" --output "$OUT/heldout_control_seed$seed.json" --control random-init \
    --control-seed "$seed" --calibration-stats "$OUT/stats_calibration.parquet" \
    --control-calibration-stats "$TMP/stats_calibration_control_$seed.parquet"
done
