"""Report of the A/B job: Markdown with PASS/FAIL criteria, and its figures (PNG + PDF).

One function per figure (results dict in, Figure out); `write_report(results, out_dir)` writes
`ab_test.json`, `ab_test.md` and `figures/*.png|pdf`. Figures use line styles and hatches, not
only colour, so they read in greyscale. Test: `pytest tests/test_ab_job.py`.
"""

from __future__ import annotations

import shlex

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .ab_test import MODES, TIERS, write_json  # noqa: E402

STYLE = {"var": {"color": "black", "linestyle": "-", "marker": "o", "hatch": ""},
         "baseline": {"color": "0.55", "linestyle": "--", "marker": "s", "hatch": "//"}}


def fig_throughput(results: dict):
    th = results["throughput"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for ax, key, title in ((axes[0], "windows", "served tokens/s (server counters, shared load)"),
                           (axes[1], "service_windows", "service tokens/s (per second of model time)")):
        rows = th[key]
        for m in MODES:
            pts = [(r["t_s"], r[m]) for r in rows if r.get(m) is not None]
            if pts:
                s = STYLE[m]
                ax.plot(*zip(*pts), color=s["color"], linestyle=s["linestyle"], marker=s["marker"], ms=3, label=m)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("time since load start (s)")
        ax.set_ylabel("generated tokens / s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_latency(results: dict):
    lat = results["latency_s"]
    keys = [k for k in lat.get("var", {}) if lat["var"][k].get("n")]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.38
    for j, m in enumerate(MODES):
        p50 = [lat[m].get(k, {}).get("p50") or 0.0 for k in keys]
        p99 = [lat[m].get(k, {}).get("p99") or 0.0 for k in keys]
        xs = [i + (j - 0.5) * width for i in range(len(keys))]
        ax.bar(xs, p99, width, color="white", edgecolor=STYLE[m]["color"], hatch=STYLE[m]["hatch"], label=f"{m} p99")
        ax.bar(xs, p50, width, color=STYLE[m]["color"], alpha=0.8, label=f"{m} p50")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_title("latency and time to first token per mode (p50 filled, p99 outlined)", fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig


def fig_tiers(results: dict):
    per_layer = results["tiers"]["var_perplexity_pass"]["per_layer"]
    layers = sorted(per_layer, key=int)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    bottom = [0.0] * len(layers)
    hatches = {"fast": "", "learned": "xx"}
    greys = {"fast": "0.2", "learned": "0.9"}
    for t in TIERS:
        vals = [per_layer[l].get(t) or 0.0 for l in layers]
        ax.bar(layers, vals, bottom=bottom, color=greys[t], hatch=hatches[t], edgecolor="black", label=t)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("share of routing decisions")
    ax.set_ylim(0, 1)
    ax.set_title("VAR tiers per layer (held-out perplexity pass)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_perplexity(results: dict):
    per = results["perplexity"]["per_text"]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    xs = [math.exp(p["nll_baseline"]) for p in per]
    ys = [math.exp(p["nll_var"]) for p in per]
    ax.scatter(xs, ys, s=12, color="black")
    lim = [min(xs + ys) * 0.9, max(xs + ys) * 1.1]
    ax.plot(lim, lim, color="0.5", linestyle="--", label="equal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("perplexity, baseline")
    ax.set_ylabel("perplexity, VAR")
    ax.set_title("held-out perplexity per text", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


FIGURES = {"throughput": fig_throughput, "latency": fig_latency, "tiers": fig_tiers, "perplexity": fig_perplexity}


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def markdown(results: dict) -> str:
    cfg, th, ppl = results["config"], results["throughput"], results["perplexity"]
    req = results["requests"]
    server_args = cfg.get("server_args") or []
    extra = f" --server-args \"{shlex.join(server_args)}\"" if server_args else ""
    lines = [
        "# Phase 2 A/B test: VAR on vs off under the same load", "",
        f"Command: `varmoe ab-test --duration {cfg['duration_s']:.0f} --users {cfg['users']} --output-dir {cfg['output_dir']}{extra}`"
        f" (model: {cfg['model'] or 'server default (reference model)'}; wall time {results['wall_s']:.0f} s).", "",
        "Half of the Locust users pin `var: true`, half `var: false` on every request, so both modes share one server "
        "and one load. Time windows are the /metrics sampling interval "
        f"({th['window_s']:.0f} s); intervals are 95%: Student t over windows with the sample size reduced for the "
        "windows' lag-1 autocorrelation, and for ratios a circular block bootstrap over windows (blocks of "
        f"{th['service_ratio'].get('block', 1)} consecutive windows), since neighbouring windows share batches and load.", "",
        "## Success criteria", "", "| criterion | rule | value | 95% CI | result |", "|---|---|---|---|---|",
    ]
    for c in results["criteria"]:
        if c["name"] == "speedup":
            val = "n/a" if c["value"] is None else f"{c['value']:.3f}x"
            ci = "n/a" if not c["ci"] or c["ci"][0] is None else f"{c['ci'][0]:.3f}x to {c['ci'][1]:.3f}x"
        else:
            val = _pct(c["value"])
            ci = "n/a" if not c["ci"] else f"{_pct(c['ci'][0])} to {_pct(c['ci'][1])}"
        lines.append(f"| {c['name']} | {c['rule']} | {val} | {ci} | **{'PASS' if c['pass'] else 'FAIL'}** |")
    lines += ["", "## Requests", "",
              f"{req['requests']} requests ({req['by_mode']['var']} VAR, {req['by_mode']['baseline']} baseline); "
              f"status counts {req['by_status']}; 5xx: {req['status_5xx']}; 429: {req['status_429']}.", "",
              "## Throughput (generated tokens/s)", "", "| measure | VAR | baseline | VAR / baseline |", "|---|---|---|---|"]
    for key, ratio_key, name in (("service_tokens_per_s", "service_ratio", "service (per second of model time)"),
                                 ("shared_tokens_per_s", "shared_ratio", "served (server counters, shared load)")):
        v, b, r = th[key]["var"], th[key]["baseline"], th[ratio_key]
        cell = lambda m: f"{_f(m['mean'])} [{_f(m['lo'])}, {_f(m['hi'])}] (n={m['n']})"  # noqa: E731
        lines.append(f"| {name} | {cell(v)} | {cell(b)} | {_f(r['ratio'])} [{_f(r['lo'])}, {_f(r['hi'])}] |")
    if ((results.get("var_status") or {}).get("var") or {}).get("engine") == "vllm":
        how = ("The served rate is what each half of the clients received. On the vLLM engine both modes share every "
               "batch, row by row (each request's rows are routed in its own mode), so each step runs at the speed of "
               "its mix and neither rate can separate the modes' speeds: read the speed of each mode from a benchmark "
               "that runs one mode at a time (benchmarks/vllm_throughput.py), and this report for quality, tiers and "
               "verification.")
    else:
        how = ("The served rate is what each half of the clients received. Batches hold one mode and alternate, so "
               "each client also waits for the other mode's batches; that rate therefore moves little even when one "
               "mode is faster. The service rate (tokens per second between a request's batch start and its end) "
               "measures the speed of each mode's own batches and is the speedup criterion.")
    lines += ["", how, "",
              "## Latency (client side, seconds)", "", "| request | mode | p50 | p90 | p99 | n |", "|---|---|---|---|---|---|"]
    for m in MODES:
        for k, p in results["latency_s"][m].items():
            if p.get("n"):
                lines.append(f"| {k} | {m} | {_f(p['p50'])} | {_f(p['p90'])} | {_f(p['p99'])} | {p['n']} |")
    tiers = results["tiers"]
    lines += ["", "## Routing tiers and verification", "",
              f"VAR requests under load: fast {_pct(tiers['var_requests_under_load']['fast'])}, "
              f"learned {_pct(tiers['var_requests_under_load']['learned'])} "
              f"of {tiers['var_requests_under_load']['decisions']:,} decisions.", "",
              "| layer | fast | learned | decisions (VAR perplexity pass) |", "|---|---|---|---|"]
    for layer, s in sorted(tiers["var_perplexity_pass"]["per_layer"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {layer} | {_pct(s['fast'])} | {_pct(s['learned'])} | {s['decisions']:,.0f} |")
    ver = results["verification"]
    if not ver["under_load"]["checks"] and not ver["var_perplexity_pass"]["checks"]:
        shadow = ((results.get("var_status") or {}).get("var") or {}).get("config", {}).get("shadow_rate")
        lines += ["", f"No verification checks ran: the served VAR configuration has shadow_rate = {shadow} "
                  "(verification of fast decisions against the learned router is off), so agreement is n/a."]
    lines += ["", f"Verification agreement under load: {_pct(ver['under_load']['agreement'])} of "
              f"{ver['under_load']['checks']:,.0f} checks; in the perplexity pass: {_pct(ver['var_perplexity_pass']['agreement'])} "
              f"of {ver['var_perplexity_pass']['checks']:,.0f} (outcomes {ver['var_perplexity_pass']['counts']}).", "",
              "## Held-out perplexity (same texts, both modes)", "",
              f"{ppl['texts']} test-split texts, {ppl['tokens']:,} scored tokens: baseline {ppl['ppl_baseline']:.4f}, "
              f"VAR {ppl['ppl_var']:.4f}, ratio {ppl['ratio']:.5f} (paired bootstrap 95% CI {ppl['ratio_lo']:.5f} to "
              f"{ppl['ratio_hi']:.5f}, {ppl['n_boot']} resamples over texts).", "",
              "## Figures", ""]
    lines += [f"![{name}](figures/{name}.png)" for name in FIGURES]
    lines += ["", "Raw numbers: `ab_test.json`; Locust CSV/HTML reports and the per-request log: `run/`.", ""]
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(results, out / "ab_test.json")}
    for name, fn in FIGURES.items():
        fig = fn(results)
        for ext in ("png", "pdf"):
            fig.savefig(figs / f"{name}.{ext}", dpi=120)
        plt.close(fig)
        paths[name] = figs / f"{name}.png"
    md = out / "ab_test.md"
    md.write_text(markdown(results))
    paths["markdown"] = md
    return paths
