"""Both reference models side by side: the headline numbers read from their result files, as the
markdown tables that README.md, docs/PHASE1.md, docs/PHASE2.md and docs/OFFLOAD.md show.

    python -m analysis_jobs.model_results            # prints every table
    python -m analysis_jobs.model_results --table phase1
    python -m analysis_jobs.model_results --steps results/reference-moe-2/pipeline.json   # wall time per step

The first model's results live where its guides made them (results/phase1, results/phase2,
results/ab_test*, results/offload, models/reference-moe/var); the second model's in the one folder
`analysis_jobs.pipeline` writes (results/reference-moe-2). Nothing here computes a statistic: it
only reads and formats, and a number missing from a model's files shows as "not measured".
Test: `pytest tests/test_model_results.py` (the docs hold exactly these tables).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
MISSING = "not measured"

# where each model's files are (relative to the repository root)
MODELS: dict[str, dict[str, Any]] = {
    "reference-moe": {
        "model": "models/reference-moe", "heldout": "results/phase1/heldout.json", "report": "results/phase1/report.json",
        "tables": "models/reference-moe/var/var_tables.json", "var": "results/phase2/var_balanced.json",
        "ab": "results/ab_test/ab_test.json",
        "ab_vllm": "results/ab_test_vllm/ab_test.json",
        "sims": {"Mixtral-8x7B sizes, layers mapped 4 -> 32, cache 2 of 8, 2.6 bits":
                 "results/offload/sim_mixtral_rtx3060_k2_2bit_roofline.json"},
    },
    "reference-moe-2": {
        "model": "models/reference-moe-2", "heldout": "results/reference-moe-2/phase1/heldout.json",
        "report": "results/reference-moe-2/phase1/report.json",
        "tables": "results/reference-moe-2/phase2/tables_balanced.json",
        "tables_loose": "results/reference-moe-2/phase2/tables_t0.5.json", "var_loose": "results/reference-moe-2/phase2/var_t0.5.json",
        "var": "results/reference-moe-2/phase2/var_balanced.json",
        "ab": "results/reference-moe-2/ab_test/ab_test.json", "ab_vllm": "results/reference-moe-2/ab_test_vllm/ab_test.json",
        "sims": {f"{name} sizes, own 8 layers, cache 16 of 64, 4 bits{label}":
                 f"results/reference-moe-2/offload/sim_{shape}_rtx3060_c16_4bit{queue}.json"
                 for shape, name in (("olmoe-1b-7b", "OLMoE-1B-7B"), ("qwen3-30b-a3b", "Qwen3-30B-A3B"))
                 for queue, label in (("", ""), ("_demand_first", ", demand first"))},
    },
}


def _load(path: str) -> dict | None:
    p = REPO_ROOT / path
    return json.loads(p.read_text()) if p.exists() else None


def _pct(x: float | None, digits: int = 1) -> str:
    return MISSING if x is None else f"{100 * x:.{digits}f}%"


def _ci_pct(lo: float, hi: float, digits: int = 2) -> str:
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _all_row(heldout: dict, model: str, predictor: str) -> dict | None:
    return next((r for r in heldout["rows"] if r["model"] == model and r["predictor"] == predictor and r["layer"] == "all"), None)


def _layer_range(heldout: dict, model: str, predictor: str, metric: str) -> str:
    vals = [r[metric] for r in heldout["rows"] if r["model"] == model and r["predictor"] == predictor
            and r["layer"] != "all" and metric in r]
    return f"{100 * min(vals):.1f}-{100 * max(vals):.1f}%" if vals else MISSING


def model_facts(name: str) -> dict[str, str]:
    paths = MODELS[name]
    cfg = _load(paths["model"] + "/config.json") or {}
    card = _load(paths["model"] + "/card.json") or {}
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    shared = ", 1 gated shared expert" if cfg.get("shared_expert_intermediate_size") else ""
    loads = [min(v["top1_share"]) for v in card.get("expert_load", {}).values() if isinstance(v, dict)]
    return {
        "architecture": f"{cfg.get('architectures', ['?'])[0]}: {cfg.get('num_hidden_layers')} MoE layers, "
                        f"{experts} experts, top-{cfg.get('num_experts_per_tok')}{shared}",
        "training corpus": card.get("recipe", {}).get("dataset", "stdlib"),
        "test perplexity (unigram)": (f"{card['test_perplexity']:.2f} ({card['unigram_perplexity']:.2f})"
                                      if "test_perplexity" in card else MISSING),
        "lowest top-1 share of an expert (uniform)": (f"{100 * min(loads):.2f}% ({100 / experts:.2f}%)" if loads else MISSING),
    }


def phase1_facts(name: str) -> dict[str, str]:
    h = _load(MODELS[name]["heldout"])
    if h is None:
        return {}
    out = {"sequences per split x tokens": f"{h['num_samples_test']} x {h['max_length']} ({h['num_tokens_test']:,} test tokens)",
           "possible top-k sets": f"{_comb(h['num_experts'], h['top_k']):,}"}
    for metric, label in (("exact", "exact top-k set"), ("overlap", "overlap at k (= expert recall)"),
                          ("precision", "expert precision"), ("weight", "routing weight covered"),
                          ("expert_precision_macro", "per-expert precision, mean over experts"),
                          ("expert_recall_macro", "per-expert recall, mean over experts"),
                          ("top1", "top-1 expert in the predicted set")):
        t, c = _all_row(h, "trained", "token_table"), _all_row(h, "control", "token_table")
        if t is None or metric not in t:
            out[f"token table: {label}"] = MISSING
            continue
        cell = f"{_pct(t[metric])} (control {_pct(c[metric]) if c and metric in c else MISSING})"
        out[f"token table: {label}"] = cell
    out["token table: exact set, range over layers"] = _layer_range(h, "trained", "token_table", "exact")
    p = _all_row(h, "trained", "pair_table")
    out["(previous, token) table: exact set"] = _pct(p["exact"]) if p else MISSING
    out["(previous, token) table: overlap at k"] = _pct(p["overlap"]) if p else MISSING
    rep = _load(MODELS[name]["report"])
    for c in (rep or {}).get("criteria", []):
        verdict = "PASS" if c["pass"] else "FAIL"
        out[f"criterion {c['name']} ({c['op']} {c['target']:g})"] = f"{verdict}: {c['measured']:.3f}"
    return out


def _comb(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def _tables_facts(t: dict | None, v: dict | None, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if t is not None:
        tok, pair = sum(t["sizes"].values()), sum(t.get("pair_sizes", {}).values())
        ver = t.get("verification", {})
        out[prefix + "certified entries: token + (previous, token)"] = f"{tok:,} + {pair:,} of {ver.get('candidates', 0):,} candidates"
        out[prefix + "entries per layer (token)"] = " / ".join(str(t["sizes"][k]) for k in sorted(t["sizes"], key=int))
    if v is not None:
        dist = v["var_stats"]["overall"]["routing_distribution"]
        fast = v["agreement"]["fast"]
        out[prefix + "decisions served by the tables (evaluate sample)"] = _pct(dist["fast"])
        out[prefix + "agreement of table rows with the learned router"] = (
            f"{_pct(fast['exact_agreement'])} exact, {_pct(fast['overlap'])} overlap" if fast["n"] else "no table rows")
        b = v["paired"]["perplexity_bootstrap"]  # VAR and baseline paired on the same text in one run
        out[prefix + "perplexity change (first 256 tokens of test documents)"] = f"{b['diff_pct']:+.2f}% {_ci_pct(*b['ci95_pct'])}"
        out[prefix + "paired forward speed VAR / baseline"] = f"{v['paired']['speedup']:.3f}x"
    return out


def phase2_facts(name: str) -> dict[str, str]:
    paths = MODELS[name]
    out = _tables_facts(_load(paths["tables"]), _load(paths["var"]))
    loose = _tables_facts(_load(paths.get("tables_loose", "-")), _load(paths.get("var_loose", "-")), "target 0.5: ")
    out.update(loose or {"target 0.5: certified entries: token + (previous, token)": MISSING})
    for key, label in (("ab", "builtin"), ("ab_vllm", "vLLM")):
        ab = _load(paths[key])
        if ab is None:
            out[f"A/B ({label}): perplexity ratio"] = MISSING
            continue
        req = ab["requests"]
        out[f"A/B ({label}): requests answered 200, load"] = (
            f"{req['by_status'].get('200', 0):,} of {req['requests']:,}, {ab['config']['users']} users x {ab['config']['duration_s']:.0f} s")
        ppl = ab["perplexity"]
        out[f"A/B ({label}): perplexity ratio"] = f"{ppl['ratio']:.4f} [{ppl['ratio_lo']:.4f}, {ppl['ratio_hi']:.4f}]"
        sr = ab["throughput"]["service_ratio"]
        out[f"A/B ({label}): service tokens/s VAR / baseline"] = f"{sr['ratio']:.2f} [{sr['lo']:.2f}, {sr['hi']:.2f}]"
        out[f"A/B ({label}): table share under load"] = _pct(ab["tiers"]["var_requests_under_load"]["fast"])
        ver = ab["verification"]["under_load"]
        out[f"A/B ({label}): shadow checks agreeing"] = (f"{_pct(ver['agreement'])} of {int(ver['checks']):,}"
                                                          if ver.get("checks") else "no checks")
    return out


def offload_facts(name: str) -> dict[str, dict[str, str]]:
    """One column per simulated configuration of the model."""
    cols: dict[str, dict[str, str]] = {}
    for label, path in MODELS[name]["sims"].items():
        d = _load(path)
        if d is None:
            continue
        var = d["predictors"]["var"]
        pol = d["policies"]
        lru = pol["lru"]["tokens_per_s"]
        col = {}
        for pred, what in (("var", "certified VAR tables"), ("var_pair", "(previous, token) sets"),
                            ("token_modal", "token modal set (unverified)"), ("speculative", "next-layer gate")):
            acc = d["predictors"].get(pred)
            if acc is None:
                continue
            cov = acc["coverage"]
            col[f"{what}: share of (token, layer) predicted, precision"] = (
                f"{_pct(sum(cov) / len(cov))}, {_pct(_mean_weighted(acc['precision'], cov))}"
                if sum(cov) else f"{_pct(0.0)}, none")
        col["LRU: hit rate, tokens/s"] = f"{_pct(pol['lru']['hit_rate'])}, {lru:.2f}"
        for p in ("var", "var_pair", "token_modal", "speculative", "combined", "oracle"):
            if p in pol:
                col[f"{p}: tokens/s vs LRU"] = f"{pol[p]['tokens_per_s'] / lru:.3f}x"
        cols[f"{name}: {label}"] = col
    return cols


def _mean_weighted(vals: list[float], weights: list[float]) -> float | None:
    pairs = [(v, w) for v, w in zip(vals, weights) if w > 0 and v == v]
    tot = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / tot if tot else None


def _render(columns: dict[str, dict[str, str]], first: str = "measure") -> str:
    rows: list[str] = []
    for col in columns.values():
        rows += [r for r in col if r not in rows]
    lines = ["| " + " | ".join([first, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([r, *(c.get(r, MISSING) for c in columns.values())]) + " |" for r in rows]
    return "\n".join(lines)


HEADLINE_ROWS = ("architecture", "test perplexity (unigram)", "token table: exact top-k set",
                 "token table: overlap at k (= expert recall)", "token table: routing weight covered",
                 "decisions served by the tables (evaluate sample)", "agreement of table rows with the learned router",
                 "perplexity change (first 256 tokens of test documents)", "A/B (builtin): service tokens/s VAR / baseline",
                 "A/B (vLLM): perplexity ratio", "var: tokens/s vs LRU", "token_modal: tokens/s vs LRU",
                 "oracle: tokens/s vs LRU")


def headline_facts(name: str) -> dict[str, str]:
    """README's rows: the first offload configuration of each model stands for its offload column."""
    offload = next(iter(offload_facts(name).items()), ("", {}))
    facts = {**model_facts(name), **phase1_facts(name), **phase2_facts(name),
             **{f"{k} ({offload[0].split(': ', 1)[-1]})": v for k, v in offload[1].items()}}
    out = {}
    for row in HEADLINE_ROWS:
        key = next((k for k in facts if k == row or k.startswith(row + " (")), None)
        out[row] = facts[key] + (f" ({key[len(row) + 2:-1]})" if key and key != row else "") if key else MISSING
    return out


TABLES: dict[str, Callable[[], str]] = {
    "headline": lambda: _render({n: headline_facts(n) for n in MODELS}),
    "models": lambda: _render({n: model_facts(n) for n in MODELS}),
    "phase1": lambda: _render({n: phase1_facts(n) for n in MODELS}, "held-out (tables on calibration, scored on test)"),
    "phase2": lambda: _render({n: phase2_facts(n) for n in MODELS}, "balanced tables (certified on calibration), test split"),
    "offload": lambda: _render({k: v for n in MODELS for k, v in offload_facts(n).items()}, "simulated on an RTX 3060"),
}


def step_times(manifest_path: str | Path) -> str:
    """The wall time of each finished step of a pipeline run (its `pipeline.json`)."""
    steps = json.loads(Path(manifest_path).read_text())["steps"]
    lines = ["| step | wall time (s) |", "|---|---|", *(f"| {k} | {v['seconds']:.0f} |" for k, v in steps.items())]
    total = sum(v["seconds"] for v in steps.values())
    return "\n".join([*lines, f"| all {len(steps)} steps | {total:.0f} ({total / 60:.1f} min) |"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", choices=sorted(TABLES), default=None, help="one table (default all)")
    ap.add_argument("--steps", default=None, help="print the step times of this pipeline.json instead")
    a = ap.parse_args(argv)
    if a.steps:
        print(step_times(a.steps))
        return 0
    for name in ([a.table] if a.table else TABLES):
        print(f"<!-- {name} -->\n{TABLES[name]()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
