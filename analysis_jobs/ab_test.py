"""The Phase 2 A/B job: VAR on vs off on one server, under one Locust load, with statistics.

`run_ab_test(ABConfig)`:
1. starts `varmoe serve` on a free 127.0.0.1 port with a fresh admin token (or uses `url`);
2. warms both modes up, then runs the Locust A/B load (`loadtests`, mode `ab`: half the users
   pinned to `var: true`, half to `var: false`) while sampling /metrics every `sample_every_s`;
3. measures held-out perplexity of the same test-split texts in both modes via /v1/perplexity,
   snapshotting /metrics around the VAR pass for clean per-layer tier shares and verification;
4. returns a results dict (ab_report.py renders JSON, Markdown and plots).

Speed is measured two ways (both in the report): tokens/s per mode from the server's counters over
time windows (shared load: with batches of one mode alternating, both halves of the clients wait for
each other's batches, so this ratio understates a speed difference), and the service throughput,
generated tokens per second of model time (total - queue) of each mode's requests, which is what the
speedup criterion uses. Run: `varmoe ab-test --duration 120 --users 8`. Test: `pytest tests/test_ab_job.py`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from var_moe.errors import InvalidInputError, VarMoeError
from var_moe.var.served import TIERS

from . import ab_stats
from .prom import MetricsSampler, diff, fetch, histogram_quantile, label_values, series
from .server_process import ManagedServer


class ServerAnswerError(VarMoeError, RuntimeError):
    """The server under test answered something the job cannot go on with (the message quotes it)."""


MODES = ("var", "baseline")
CRITERIA = {"quality_max_ppl_increase": 0.01, "min_speedup": 1.2, "max_learned_share": 0.15}


@dataclass(frozen=True)
class ABConfig:
    url: str | None = None  # None: start `varmoe serve` on a free port
    model: str | None = None  # model folder for the started server (None: the server's default)
    server_args: tuple[str, ...] = ()  # extra `varmoe serve` flags
    duration_s: float = 120.0
    users: int = 8
    spawn_rate: float = 4.0
    output_dir: str = "results/ab_test"
    sample_every_s: float = 5.0  # /metrics sampling interval = the time window of the CIs
    dataset: str = "stdlib"  # prompts and perplexity texts: its test split
    ppl_texts: int = 32
    ppl_chars: int = 1500  # characters per perplexity text (cut at a line boundary)
    max_new: tuple[int, int] = (16, 48)
    n_boot: int = 2000
    seed: int = 0
    threads: int = 1  # torch threads of a started server

    def __post_init__(self):
        for name in ("duration_s", "spawn_rate", "sample_every_s"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"--{name.replace('_s', '').replace('_', '-')} must be positive")
        for name in ("users", "ppl_texts", "ppl_chars", "n_boot", "threads"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.users < 2:
            raise InvalidInputError("--users must be at least 2 (half of the users run each mode)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def perplexity_texts(dataset: str, n: int, chars: int) -> list[str]:
    """The first `chars` characters (at a line boundary) of the first n test-split documents."""
    from var_moe.corpus import iter_documents

    out = []
    for doc in iter_documents(dataset, "test"):
        text = doc.text[:chars]
        cut = text.rfind("\n")
        text = text[: cut if cut > chars // 2 else len(text)].strip()
        if len(text) >= 64:
            out.append(text)
        if len(out) >= n:
            break
    if not out:
        raise InvalidInputError(f"--dataset {dataset!r} has no test-split text to measure perplexity on")
    return out


def measure_perplexity(url: str, texts: list[str], var: bool, chunk: int = 8, timeout_s: float = 600.0) -> list[dict]:
    """Per-text {tokens, mean_nll, perplexity} in one mode; a 413 (too long) halves that text once more."""
    out = []
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for i in range(0, len(texts), chunk):
            part = texts[i:i + chunk]
            r = client.post("/v1/perplexity", json={"text": part, "var": var})
            if r.status_code == 200:
                out.extend(r.json()["results"])
                continue
            if r.status_code != 413:
                raise ServerAnswerError(f"/v1/perplexity answered {r.status_code}: {r.text[:300]}")
            for text in part:  # one by one, shortening the text that is too long
                for _ in range(8):
                    r = client.post("/v1/perplexity", json={"text": text, "var": var})
                    if r.status_code != 413:
                        break
                    text = text[: len(text) // 2]
                if r.status_code != 200:
                    raise ServerAnswerError(f"/v1/perplexity answered {r.status_code}: {r.text[:300]}")
                out.append(r.json()["results"][0])
    return out


def tier_shares(delta, per_layer: bool = True) -> dict:
    """Shares of fast/cached/learned of VAR-mode decisions from a /metrics difference, overall and per layer."""
    layers = label_values(delta, "varmoe_routing_decisions_total", "layer")
    out = {"overall": {}, "per_layer": {}}
    tot = {t: series(delta, "varmoe_routing_decisions_total", tier=t, mode="var") for t in TIERS}
    n = sum(tot.values())
    out["overall"] = {t: (tot[t] / n if n else None) for t in TIERS} | {"decisions": n}
    for layer in layers if per_layer else []:
        c = {t: series(delta, "varmoe_routing_decisions_total", layer=layer, tier=t, mode="var") for t in TIERS}
        m = sum(c.values())
        out["per_layer"][layer] = {t: (c[t] / m if m else None) for t in TIERS} | {"decisions": m}
    return out


def verification(delta) -> dict:
    outcomes = label_values(delta, "varmoe_verification_checks_total", "outcome")
    counts = {o: series(delta, "varmoe_verification_checks_total", outcome=o) for o in outcomes}
    total = sum(counts.values())
    return {"counts": counts, "checks": total, "agreement": (counts.get("agree", 0.0) / total) if total else None}


def request_tiers(rows: list[dict], mode: str) -> dict:
    """Tier shares summed over the per-request routing of successful generate requests in `mode`."""
    c = {t: 0 for t in TIERS}
    for r in rows:
        if r.get("status") == 200 and r.get("mode") == mode and isinstance(r.get("routing"), dict):
            for t in TIERS:
                c[t] += int(r["routing"].get(t, 0))
    n = sum(c.values())
    return {t: (c[t] / n if n else None) for t in TIERS} | {"decisions": n}


def latency_table(rows: list[dict]) -> dict:
    """Client latency and TTFT percentiles per (endpoint kind, mode), successful requests only."""
    out: dict[str, dict] = {}
    ok = [r for r in rows if r.get("status") == 200 and r.get("mode") in MODES]
    groups = sorted({(r["endpoint"], r["kind"]) for r in ok})
    for mode in MODES:
        m = [r for r in ok if r["mode"] == mode]
        entry = {f"{e} {k}": ab_stats.percentiles([r["latency_s"] for r in m if (r["endpoint"], r["kind"]) == (e, k)])
                 for e, k in groups}
        entry["server_ttft_s"] = ab_stats.percentiles(
            [r["timings"]["ttft_s"] for r in m if r.get("timings") and r["timings"].get("ttft_s") is not None])
        entry["client_ttft_s (streams)"] = ab_stats.percentiles([r["client_ttft_s"] for r in m if r.get("client_ttft_s")])
        out[mode] = entry
    return out


def criteria(ppl: dict, speed: dict, learned_share: float | None) -> list[dict]:
    inc = ppl["ratio"] - 1.0
    sp = speed.get("ratio")
    return [
        {"name": "quality preserved", "rule": "perplexity increase < 1%", "value": inc,
         "ci": [ppl["ratio_lo"] - 1.0, ppl["ratio_hi"] - 1.0], "pass": inc < CRITERIA["quality_max_ppl_increase"]},
        {"name": "speedup", "rule": "VAR / baseline service tokens/s >= 1.2x", "value": sp,
         "ci": [speed.get("lo"), speed.get("hi")], "pass": sp is not None and sp >= CRITERIA["min_speedup"]},
        {"name": "learned routing", "rule": "share of learned-tier decisions in VAR mode < 15%", "value": learned_share,
         "ci": None, "pass": learned_share is not None and learned_share < CRITERIA["max_learned_share"]},
    ]


def _warm_up(url: str, prompt: str) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        for var in (True, False):
            r = c.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 4, "var": var})
            if r.status_code != 200:
                raise ServerAnswerError(f"warm-up /v1/generate (var={var}) answered {r.status_code}: {r.text[:300]}")


def run_ab_test(cfg: ABConfig, log=print) -> dict:
    from loadtests.run import LoadConfig, read_request_log, run_load, summarize

    from .prompt_file import build_prompts, fit_to_model, write_prompts

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "run"
    work.mkdir(exist_ok=True)
    server = None
    url = cfg.url
    started = time.time()
    try:
        if url is None:
            log("starting varmoe serve ...")
            server = ManagedServer(cfg.model, args=list(cfg.server_args), threads=cfg.threads,
                                   log_path=work / "server.log").wait_ready()
            url = server.url
        status = httpx.get(url + "/var/status", timeout=30).json()
        if not status.get("var", {}).get("available"):
            raise ServerAnswerError(f"VAR is unavailable on the server: {status.get('var', {}).get('unavailable_reason')}")
        model_dir = Path(cfg.model or httpx.get(url + "/readyz", timeout=30).json().get("model", ""))
        fit = (model_dir / "tokenizer_config.json").exists() or (model_dir / "tokenizer.json").exists()
        prompts = build_prompts(cfg.dataset, "test", 200, cfg.seed)
        if fit:  # cut prompts to the model's context so the load measures serving, not 413s
            prompts = fit_to_model(prompts, model_dir, reserve=max(cfg.max_new))
        prompts_path = write_prompts(prompts, work / "prompts.jsonl")
        _warm_up(url, prompts[0]["text"])
        before = fetch(url)
        sampler = MetricsSampler(url, cfg.sample_every_s).start()
        log(f"A/B load: {cfg.users} users for {cfg.duration_s:.0f} s against {url} ...")
        load = run_load(LoadConfig(url=url, users=cfg.users, spawn_rate=cfg.spawn_rate, duration_s=cfg.duration_s,
                                   mode="ab", out_dir=str(work), prompts=str(prompts_path), max_new=cfg.max_new),
                        quiet=True)
        snapshots = sampler.stop()
        after_load = fetch(url)
        rows = read_request_log(load.requests_log)
        log("held-out perplexity in both modes ...")
        texts = perplexity_texts(cfg.dataset, cfg.ppl_texts, cfg.ppl_chars)
        if fit:
            texts = [p["text"] for p in fit_to_model([{"text": t} for t in texts], model_dir, reserve=0)]
        base_items = measure_perplexity(url, texts, var=False)
        m0 = fetch(url)
        var_items = measure_perplexity(url, texts, var=True)
        m1 = fetch(url)
        final_status = httpx.get(url + "/var/status", timeout=30).json()
    finally:
        exit_code = server.stop() if server is not None else None

    load_delta = diff(after_load, before)
    ppl_delta = diff(m1, m0)
    windows = ab_stats.window_rates(snapshots, "varmoe_generated_tokens_total", "mode", MODES)
    service = ab_stats.service_windows(rows, cfg.sample_every_s)
    speed = ab_stats.paired_ratio_ci([w["var"] for w in service], [w["baseline"] for w in service],
                                     cfg.n_boot, cfg.seed)
    shared = ab_stats.paired_ratio_ci([w["var"] for w in windows], [w["baseline"] for w in windows], cfg.n_boot, cfg.seed)
    ppl = ab_stats.paired_bootstrap_ppl([i["mean_nll"] * i["tokens"] for i in var_items],
                                        [i["mean_nll"] * i["tokens"] for i in base_items],
                                        [i["tokens"] for i in base_items], cfg.n_boot, cfg.seed)
    if [i["tokens"] for i in var_items] != [i["tokens"] for i in base_items]:
        raise ServerAnswerError("the two modes scored different token counts for the same texts")
    load_tiers_var = request_tiers(rows, "var")
    results = {
        "config": cfg.to_dict() | {"url": url if cfg.url else "(started on a free port)"},
        "started_unix": started, "wall_s": time.time() - started, "server_exit_code": exit_code,
        "locust": {"returncode": load.returncode, "reports": [p.name for p in (load.stats_csv, load.history_csv, load.html)]},
        "requests": summarize(rows) | {"by_mode": {m: sum(1 for r in rows if r.get("mode") == m) for m in MODES}},
        "throughput": {
            "shared_tokens_per_s": {m: ab_stats.mean_ci([w[m] for w in windows]) for m in MODES},
            "shared_ratio": shared,
            "service_tokens_per_s": {m: ab_stats.mean_ci([w[m] for w in service]) for m in MODES},
            "service_ratio": speed,
            "windows": windows, "service_windows": service, "window_s": cfg.sample_every_s,
        },
        "latency_s": latency_table(rows),
        "server_histograms": {m: {"request_p50": histogram_quantile(load_delta, "varmoe_request_duration_seconds", 0.5, mode=m),
                                  "request_p99": histogram_quantile(load_delta, "varmoe_request_duration_seconds", 0.99, mode=m),
                                  "ttft_p50": histogram_quantile(load_delta, "varmoe_time_to_first_token_seconds", 0.5, mode=m),
                                  "ttft_p99": histogram_quantile(load_delta, "varmoe_time_to_first_token_seconds", 0.99, mode=m)}
                              for m in MODES},
        "tiers": {"var_requests_under_load": load_tiers_var, "baseline_requests_under_load": request_tiers(rows, "baseline"),
                  "var_perplexity_pass": tier_shares(ppl_delta)},
        "verification": {"under_load": verification(load_delta), "var_perplexity_pass": verification(ppl_delta)},
        "perplexity": ppl | {"per_text": [{"tokens": b["tokens"], "nll_var": v["mean_nll"], "nll_baseline": b["mean_nll"]}
                                          for v, b in zip(var_items, base_items)]},
        "var_status": final_status,
    }
    results["criteria"] = criteria(ppl, speed, load_tiers_var.get("learned"))
    return results


def write_json(results: dict, path: Path) -> Path:
    Path(path).write_text(json.dumps(results, indent=2, default=str))
    return Path(path)
