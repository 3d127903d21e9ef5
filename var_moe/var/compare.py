"""The baseline-vs-VAR comparison block (the seed's format) from two `varmoe evaluate` outputs.

The speedup shown is the PAIRED ratio measured inside the VAR run (unmodified model and VAR
interleaved in one process). The ratio of the two files' separate throughputs is printed only
as a secondary line, marked as such: on a shared machine two separate runs can differ by far
more than any router change. Perplexity difference: baseline file vs VAR file, with the paired
bootstrap CI over documents from the VAR run. Test: `pytest tests/test_var_eval.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

SPEEDUP_TARGET = 1.2
LEARNED_MAX = 0.15


def load_result(path: str | Path, mode: str) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (write it with `varmoe evaluate --mode {mode}`)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{p} is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or "evaluation" not in data or "throughput" not in data:
        raise InvalidInputError(f"{p} is not a `varmoe evaluate` output (no evaluation / throughput)")
    if data.get("mode") != mode:
        raise InvalidInputError(f"{p} is a --mode {data.get('mode')} result; expected --mode {mode}")
    return data


def comparison(base: dict[str, Any], var: dict[str, Any]) -> dict[str, Any]:
    pv = var["evaluation"]["perplexity"]
    paired = var.get("paired", {})
    pb_file = base["evaluation"]["perplexity"]
    pb_paired = paired.get("baseline_evaluation", {}).get("perplexity")
    # the difference uses the baseline measured on the same batches inside the VAR run when present
    pb = pb_paired if pb_paired is not None else pb_file
    same_text = pb_paired is None or abs(pb_paired / pb_file - 1) < 1e-6
    dist = var["var_stats"]["overall"]["routing_distribution"]
    max_deg = var.get("config", {}).get("max_quality_degradation", 0.01)
    diff = 100 * (pv / pb - 1)
    return {
        "perplexity": {"baseline": pb, "var": pv, "diff_pct": diff, "baseline_file": pb_file,
                       "same_text_as_baseline_file": same_text,
                       "bootstrap": paired.get("perplexity_bootstrap")},
        "throughput": {"baseline": base["throughput"]["tokens_per_second"], "var": var["throughput"]["tokens_per_second"],
                       "paired_baseline": paired.get("baseline_throughput", {}).get("tokens_per_second"),
                       "speedup_paired": paired.get("speedup"),
                       "ratio_separate_runs": var["throughput"]["tokens_per_second"] / base["throughput"]["tokens_per_second"]},
        "routing_distribution": dist,
        "criteria": {
            "quality_preserved": diff < 100 * max_deg,
            "learned_below_15pct": dist["learned"] < LEARNED_MAX,
            "speedup_achieved": (paired.get("speedup") or 0) >= SPEEDUP_TARGET,
        },
        "max_quality_degradation_pct": 100 * max_deg,
    }


def format_comparison(c: dict[str, Any], base: dict[str, Any], var: dict[str, Any]) -> str:
    mark = lambda ok: "\u2713 PASS" if ok else "\u2717 FAIL"  # noqa: E731
    p, t = c["perplexity"], c["throughput"]
    lines = ["Comparison: Baseline vs VAR", "=" * 66, "", "Perplexity:",
             f"  Baseline: {p['baseline']:.4f}", f"  VAR:      {p['var']:.4f}", f"  Difference: {p['diff_pct']:+.3f}%"]
    if not p["same_text_as_baseline_file"]:
        lines.insert(4, f"  WARNING: the baseline file scored other text (perplexity {p['baseline_file']:.4f}); "
                        "shown is the baseline measured inside the VAR run on the same batches")
    if p["bootstrap"]:
        lo, hi = p["bootstrap"]["ci95_pct"]
        lines.append(f"  Paired bootstrap over {p['bootstrap']['documents']} documents: {p['bootstrap']['diff_pct']:+.3f}% "
                     f"(95% CI {lo:+.3f}% .. {hi:+.3f}%)")
    lines += ["", "Throughput:", f"  Baseline: {t['paired_baseline'] or t['baseline']:.1f} tokens/sec (same process as VAR)",
              f"  VAR:      {t['var']:.1f} tokens/sec"]
    if t["speedup_paired"] is not None:
        lines.append(f"  Speedup:  {t['speedup_paired']:.3f}x (paired: interleaved in one process)")
    lines.append(f"  Ratio of separate runs (secondary, not a speedup claim): {t['ratio_separate_runs']:.3f}x")
    lat_b = var.get("paired", {}).get("baseline_throughput", base["throughput"])["latency"]
    lat_v = var["throughput"]["latency"]
    lines.append("  Latency per batch (ms) p50/p95/p99: baseline "
                 f"{lat_b['p50']:.1f}/{lat_b['p95']:.1f}/{lat_b['p99']:.1f}, VAR {lat_v['p50']:.1f}/{lat_v['p95']:.1f}/{lat_v['p99']:.1f}")
    lines += ["", "VAR Routing Distribution:"] + [f"  {k:8s}: {100 * v:.1f}%" for k, v in c["routing_distribution"].items()]
    agr = var.get("agreement", {})
    if agr.get("fast", {}).get("n"):
        fc = agr["fast"]
        lines.append(f"  agreement with learned router (fast): exact top-k set {100 * fc['exact_agreement']:.1f}%, "
                     f"overlap {100 * fc['overlap']:.1f}%; all decisions exact {100 * agr['all_decisions_exact']:.1f}%")
    ov = var["var_stats"]["overall"]
    if ov.get("adaptive_single"):
        lines.append(f"  adaptive k: {ov['adaptive_single']} token-layer decisions used one expert "
                     f"({100 * ov['adaptive_single'] / max(ov['calls'], 1):.1f}%)")
    k = c["criteria"]
    lines += ["", "Success Criteria:",
              f"  Quality preserved:    {mark(k['quality_preserved'])} (perplexity degradation < {c['max_quality_degradation_pct']:.0f}%)",
              f"  Constraint met:       {mark(k['learned_below_15pct'])} (learned routing < 15%)",
              f"  Speedup achieved:     {mark(k['speedup_achieved'])} (paired speedup >= {SPEEDUP_TARGET}x)"]
    return "\n".join(lines)


def compare_files(baseline_path: str | Path, var_path: str | Path) -> tuple[str, dict[str, Any]]:
    base, var = load_result(baseline_path, "baseline"), load_result(var_path, "var")
    c = comparison(base, var)
    return format_comparison(c, base, var), c
