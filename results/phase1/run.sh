#!/usr/bin/env bash
# Phase 1 results: capture (trained model + random-init control) on the calibration and test splits,
# held-out predictability, the hypothesis reports and the figures. Run from the repository root:
#     bash results/phase1/run.sh            # MODEL / N / LEN / OUT may be overridden from the environment
# Every number in docs/PHASE1.md comes from the files this script writes.
set -euo pipefail
MODEL=${MODEL:-models/reference-moe}
N=${N:-1500}         # sequences per split and pass (the committed results use 1500)
LEN=${LEN:-256}      # tokens per sequence
OUT=${OUT:-results/phase1}
SEED=${SEED:-0}      # seed of the random-init control (the same weights in capture and predictability)
THREADS=${THREADS:-1}
common=(--model "$MODEL" --num-samples "$N" --max-length "$LEN" --threads "$THREADS")

for split in test calibration; do
  varmoe capture "${common[@]}" --split "$split" --output "$OUT/stats_${split}.parquet" --no-progress
  varmoe capture "${common[@]}" --split "$split" --control random-init --seed "$SEED" \
    --output "$OUT/stats_${split}_control.parquet" --no-progress
done

varmoe predictability "${common[@]}" --output "$OUT/heldout.json" --control random-init --control-seed "$SEED"

varmoe validate --input "$OUT/stats_test.parquet" --output "$OUT/report.txt" --json "$OUT/report.json" \
  --heldout "$OUT/heldout.json"
varmoe validate --input "$OUT/stats_test_control.parquet" --output "$OUT/report_control.txt" \
  --json "$OUT/report_control.json"
varmoe plot --input "$OUT/stats_test.parquet" --output-dir "$OUT/figures" --heldout "$OUT/heldout.json"
varmoe plot --input "$OUT/stats_test_control.parquet" --output-dir "$OUT/figures_control"
