"""Markdown summary table of the Phase 2 results (one row per `varmoe evaluate --mode var` output;
perplexities are the paired ones measured inside each VAR run).

    python -m benchmarks.var_phase2_table results/phase2/baseline.json results/phase2/var_*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(name: str, base: dict, var: dict) -> str:
    o = var["var_stats"]["overall"]
    d = o["routing_distribution"]
    boot = var["paired"]["perplexity_bootstrap"]
    lo, hi = boot["ci95_pct"]
    agr = var["agreement"]["fast_and_cached"]
    exact = f"{100 * agr['exact_agreement']:.1f}%" if agr["exact_agreement"] is not None else "-"
    single = f"{100 * o['adaptive_single'] / max(o['calls'], 1):.1f}%"
    return (f"| {name} | {o['table_size']} | {100 * d['fast']:.1f}% | {100 * d['cached']:.1f}% | {100 * d['learned']:.1f}% "
            f"| {single} | {var['paired']['baseline_evaluation']['perplexity']:.3f} | {var['evaluation']['perplexity']:.3f} "
            f"| {boot['diff_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}] | {exact} | {var['paired']['speedup']:.3f}x "
            f"({', '.join(f'{x:.2f}' for x in var['paired']['speedup_per_repeat'])}) |")


def main(argv: list[str]) -> None:
    base = json.loads(Path(argv[0]).read_text())
    print("| run | table entries | fast | cached | learned | one expert | ppl baseline | ppl VAR "
          "| ppl diff [95% CI] | fast+cached = learned set | paired speedup (repeats) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in argv[1:]:
        print(row(Path(p).stem.removeprefix("var_"), base, json.loads(Path(p).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
