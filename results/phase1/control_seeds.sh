#!/usr/bin/env bash
# Is the trained-vs-control margin a property of one random initialisation? Re-runs the held-out
# predictability with random-init controls of other seeds (their own calibration tables), same
# trained model, splits and sizes as run.sh. Run from the repository root:
#     bash results/phase1/control_seeds.sh        # SEEDS / N / LEN / OUT may be overridden
# Writes $OUT/heldout_control_seed<S>.json.
set -euo pipefail
MODEL=${MODEL:-models/reference-moe}
N=${N:-1500}
LEN=${LEN:-256}
OUT=${OUT:-results/phase1}
SEEDS=${SEEDS:-1 2}
THREADS=${THREADS:-1}
common=(--model "$MODEL" --num-samples "$N" --max-length "$LEN" --threads "$THREADS")
for seed in $SEEDS; do
  varmoe predictability "${common[@]}" --output "$OUT/heldout_control_seed$seed.json" --control random-init \
    --control-seed "$seed"
done
