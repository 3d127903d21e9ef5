#!/usr/bin/env bash
# Is the trained-vs-control margin a property of one random initialisation? Re-runs the held-out
# predictability with random-init controls of other seeds (their own calibration tables), same
# trained model, splits and sizes as run.sh. Run from the repository root:
#     bash results/phase1/control_seeds.sh        # SEEDS / N / LEN / OUT may be overridden
# Writes $OUT/heldout_control_seed<S>.json and $OUT/headline.md (needs run.sh's heldout.json, control seed 0).
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

# the headline table (docs/PHASE1.md, README): seed 0 from run.sh's heldout.json, then these seeds
python - "$OUT" $SEEDS <<'PY' > "$OUT/headline.md"
import json, sys
from var_moe.validation.render import heldout_seed_table
out, seeds = sys.argv[1], [int(s) for s in sys.argv[2:]]
runs = {0: json.load(open(f"{out}/heldout.json"))} | {s: json.load(open(f"{out}/heldout_control_seed{s}.json")) for s in seeds}
for name in ("token_table", "pair_table"):
    print(f"{name}, exact top-k set match:\n\n{heldout_seed_table(runs, name)}\n")
PY
