"""Per-layer held-out agreement of VAR tables on the test split, with document-bootstrap intervals.

    python -m analysis_jobs.heldout_agreement --test-evidence results/phase2/cache/evidence_test.safetensors \
        [--tables models/reference-moe/var/var_tables.safetensors ...] \
        [--presets conservative,balanced,aggressive --evidence results/phase2/cache/evidence_calibration.safetensors] \
        [--choose-evidence results/phase2/cache/evidence_train.safetensors] [--json results/phase2/heldout_agreement.json]

Scores tables files and/or presets built from calibration evidence (`var_moe.var.tables`) against
test evidence (the unmodified model's own decisions on every test document; collect it once with
`varmoe sweep ... --test-evidence F`). Prints a markdown table: entries, coverage and agreement of
the served rows per layer, 95% percentile intervals from resampling test documents. With
--choose-evidence the presets choose their sets there (e.g. training-split documents, collected by
`varmoe build-tables --choose-evidence F`) and certify on every calibration document; they are
scored under the name `PRESET/choose:SPLIT`.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from var_moe.adapters import get_adapter
    from var_moe.loading import REFERENCE_MODEL_DIR, load_model
    from var_moe.validation.served import served_agreement
    from var_moe.var.config import get_preset
    from var_moe.var.evidence import Evidence
    from var_moe.var.tables import VARTables

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    ap.add_argument("--test-evidence", required=True)
    ap.add_argument("--tables", nargs="*", default=[], help="tables files to score")
    ap.add_argument("--presets", default="", help="comma-separated presets to build from --evidence and score")
    ap.add_argument("--evidence", default=None, help="calibration evidence (with --presets)")
    ap.add_argument("--choose-evidence", default=None, help="choosing evidence of another split (with --presets)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    test = Evidence.load(args.test_evidence)
    scored = {}
    for path in args.tables:
        scored[path] = served_agreement(VARTables.load(path), test, args.resamples)
    if args.presets:
        if not args.evidence:
            ap.error("--presets needs --evidence")
        model, _ = load_model(args.model)
        cal = Evidence.load(args.evidence)
        chooser = Evidence.load(args.choose_evidence) if args.choose_evidence else None
        for name in args.presets.split(","):
            cfg = get_preset(name).replace(pair_entries=False)  # token entries; pairs: pair_coverage.py
            tables = VARTables.from_evidence(cal, model, get_adapter(model), cfg, source=args.evidence,
                                             choose_evidence=chooser, choose_source=args.choose_evidence or "")
            label = name if chooser is None else f"{name}/choose:{chooser.metadata.get('split')}"
            scored[label] = served_agreement(tables, test, args.resamples) | {"choosing": tables.metadata["choosing"],
                                                                             "certifying": tables.metadata["certifying"]}
    print("| tables | target | layer | entries | coverage (95% CI) | agreement of served rows (95% CI) | meets target |")
    print("|---|---|---|---|---|---|---|")
    for name, s in scored.items():
        t = s["target_agreement"]
        for layer, v in s["layers"].items():
            cov = f"{100 * v['coverage']:.1f}% ({100 * v['coverage_ci95'][0]:.1f}-{100 * v['coverage_ci95'][1]:.1f})"
            agr = "-" if v["agreement"] is None else (
                f"{100 * v['agreement']:.1f}% ({100 * v['agreement_ci95'][0]:.1f}-{100 * v['agreement_ci95'][1]:.1f})")
            meets = "-" if v["meets_target"] is None else ("yes" if v["meets_target"] else "**no**")
            print(f"| {name} | {t} | {layer} | {v['table_size']} | {cov} | {agr} | {meets} |")
        o = s["overall"]
        print(f"| {name} | {t} | all | {sum(v['table_size'] for v in s['layers'].values())} | "
              f"{100 * o['coverage']:.1f}% ({100 * o['coverage_ci95'][0]:.1f}-{100 * o['coverage_ci95'][1]:.1f}) | "
              f"{100 * o['agreement']:.1f}% ({100 * o['agreement_ci95'][0]:.1f}-{100 * o['agreement_ci95'][1]:.1f}) | |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(scored, fh, indent=1)


if __name__ == "__main__":
    main()
