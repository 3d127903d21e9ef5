"""Cost of the default expert-load metrics: generated tokens/s of one engine with them on (the
default) against the same server with them off (`--no-expert-load-metrics`), interleaved in one run.

Two `varmoe serve` servers of the same engine and settings differ only in that flag. The load is
benchmarks/server_throughput.py's Locust completions load (closed-loop users, greedy
`POST /v1/completions`, `max_tokens` = --new-tokens; tokens/s counted inside the load window).
While a cell runs, a thread scrapes the server's /metrics every --scrape-s seconds (both servers
alike), so the "on" server also pays for its reads (on vLLM a call to the workers). The server not
under load is suspended (SIGSTOP of its process tree), the order of the two alternates from one
repeat to the next, and the ratio on / off is reported per repeat (the pairs closest in time) with
their median, minimum and maximum. Goal: on >= 0.99x off at 16 clients.

On a shared machine other processes' time slices swing a cell's tokens/s by tens of percent, so
each cell also records the work it cost: the CPU seconds the server's process tree used during the
cell (psutil, user + system; vLLM's worker process apart) and the tokens the server generated in it
(its own `varmoe_generated_tokens_total`), giving generated tokens per CPU second, which time taken
by other processes does not move. Both ratios are reported.

`--design toggle` (builtin engine only: vLLM compiles the counting into its graph) takes the two
servers' differences out: ONE server under one continuous Locust load, whose counting an admin
switches off and on (`POST /admin/expert-load`, effective from the next engine step) in blocks of
--block-s seconds, ordered on, off, off, on (ABBA, so a drift over time cancels within each group).
Paused, the server neither counts nor reads the counters at a scrape, as a server started with
`--no-expert-load-metrics`. A block's tokens come from the server's `varmoe_generated_tokens_total`
(counted per engine step), read by the scrape that ends the block; the ratio is taken per group of
four blocks (on tokens/s over off tokens/s) and over all blocks pooled, and the same for generated
tokens per CPU second of the server process. The server is `make serve`'s (`varmoe serve --shadow-rate
0.05`, default threads and batch size); `--pinned` gives it the two-server design's settings instead.

Run (builtin engine, main environment; vLLM engine, vLLM environment):
    .venv/bin/python -m benchmarks expert_load_overhead --engine builtin --repeats 6 \
        --output benchmarks/results/expert_load_overhead_builtin.json
    .venv-vllm/bin/python -m benchmarks expert_load_overhead --engine vllm --repeats 6 \
        --output benchmarks/results/expert_load_overhead_vllm.json
    .venv/bin/python -m benchmarks expert_load_overhead --engine builtin --design toggle --blocks 40 \
        --output benchmarks/results/expert_load_toggle_builtin.json
Results go to docs/BENCHMARKS.md (section "Expert load metrics").
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

import httpx

from analysis_jobs.server_process import ManagedServer
from benchmarks.server_throughput import locust_load, prompts
from benchmarks.vllm_throughput import only_running, vllm_env
from var_moe.loading import REFERENCE_MODEL_DIR


def tree_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the whole process tree, of its vLLM worker processes), user + system."""
    import psutil

    total = worker = 0.0
    root = psutil.Process(pid)
    for proc in [root] + root.children(recursive=True):
        try:
            t = proc.cpu_times()
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
        if "Worker" in name:
            worker += t.user + t.system
    return total, worker


def generated(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("varmoe_generated_tokens_total{"))


def scraper(url: str, every_s: float, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.wait(every_s):
                try:
                    c.get(url + "/metrics")
                except httpx.HTTPError:
                    pass

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def toggled(args, common: list[str], env: dict, prompts_file: Path, log_dir: Path, tokenizer) -> dict:
    """One server, one continuous load, counting switched per block (ABBA); see the module doc."""
    blocks = [i % 4 in (0, 3) for i in range(args.blocks)]  # True: counting on
    if args.pinned:
        threads, flags = 1, common
    else:  # what `make serve` runs: the server's default threads and batch size
        threads, flags = None, ["--shadow-rate", "0.05"]
    with ManagedServer(args.model, args=flags, threads=threads, env=env if args.pinned else {},
                       log_path=log_dir / "builtin-toggle.log") as server:
        url, auth = server.url, server.admin_headers
        locust_load(url, args.clients, argparse.Namespace(new_tokens=args.new_tokens, run_time=10, warmup=0.5),
                    prompts_file, log_dir, "warmup", tokenizer)
        # a block also spends its toggle, reading and scrape: room for 15% more than --block-s each
        whole = argparse.Namespace(new_tokens=args.new_tokens, warmup=args.warmup,
                                   run_time=int(args.warmup + 5 + args.blocks * args.block_s * 1.15 + 20))
        load = threading.Thread(target=locust_load, args=(url, args.clients, whole, prompts_file, log_dir, "toggle",
                                                          tokenizer), daemon=True)
        load.start()
        threading.Event().wait(args.warmup + 5)  # Locust's spawn and the first batches
        cells: list[dict] = []
        t, tok, cpu = time.monotonic(), generated(url), tree_cpu(server.pid)[0]
        for on in blocks:
            if not load.is_alive():
                raise SystemExit(f"the load ended before block {len(cells)} (its run time was {whole.run_time} s)")
            r = httpx.post(url + "/admin/expert-load", json={"enabled": on}, headers=auth, timeout=30)
            r.raise_for_status()
            scrapes = max(1, round(args.block_s / args.scrape_s))
            for _ in range(scrapes - 1):
                threading.Event().wait(args.block_s / scrapes)
                httpx.get(url + "/metrics", timeout=30)
            threading.Event().wait(args.block_s / scrapes)
            t1, tok1, cpu1 = time.monotonic(), generated(url), tree_cpu(server.pid)[0]
            cells.append({"on": on, "s": t1 - t, "tokens": tok1 - tok, "cpu_s": cpu1 - cpu})
            t, tok, cpu = t1, tok1, cpu1
            c = cells[-1]
            print(f"block {len(cells) - 1:3d} counting {'on ' if on else 'off'}: {c['tokens'] / c['s']:7.1f} tok/s, "
                  f"{c['tokens'] / max(c['cpu_s'], 1e-9):6.1f} tok per CPU s", flush=True)
        load.join(timeout=whole.run_time + 300)

    return {"design": "toggle", "engine": "builtin", "model": args.model, "clients": args.clients,
            "server_flags": flags, "threads": threads, "new_tokens": args.new_tokens, "blocks": args.blocks,
            "block_s": args.block_s, "scrape_s": args.scrape_s, "cells": cells, **summary(cells)}


def summary(cells: list[dict], resamples: int = 4000) -> dict:
    """Ratios on/off of tokens/s and of tokens per CPU second: per ABBA group (median, quartiles) and
    pooled over all blocks, each with a 95% bootstrap interval over groups (seeded: reproducible)."""

    def rate(cs: list[dict], key: str) -> float:
        return sum(c["tokens"] for c in cs) / max(sum(c[key] for c in cs), 1e-9)

    def ratio(groups: list[list[dict]], key: str) -> float:
        cs = [c for g in groups for c in g]
        return rate([c for c in cs if c["on"]], key) / rate([c for c in cs if not c["on"]], key)

    groups = [cells[i:i + 4] for i in range(0, len(cells) - 3, 4)]
    rng = random.Random(0)
    draws = [[rng.choice(groups) for _ in groups] for _ in range(resamples)]
    out: dict = {}
    for key, name in (("s", "ratio"), ("cpu_s", "cpu_ratio")):
        per = [ratio([g], key) for g in groups]
        medians = sorted(statistics.median(ratio([g], key) for g in d) for d in draws)
        pooled = sorted(ratio(d, key) for d in draws)
        ci = lambda v: [round(v[int(0.025 * len(v))], 4), round(v[int(0.975 * len(v)) - 1], 4)]  # noqa: E731
        out |= {f"{name}_per_group": [round(r, 4) for r in per], f"{name}_median": statistics.median(per),
                f"{name}_median_ci95": ci(medians), f"{name}_pooled": ratio(groups, key),
                f"{name}_pooled_ci95": ci(pooled)}
    out["ratio_q25_q75"] = statistics.quantiles(out["ratio_per_group"], n=4)[::2]
    on, off = [c for c in cells if c["on"]], [c for c in cells if not c["on"]]
    return out | {"tokens_per_s": {"on": rate(on, "s"), "off": rate(off, "s")}, "goal": 0.99}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["builtin", "vllm"], required=True)
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--run-time", type=int, default=20, help="seconds of load per cell")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds after spawning left out of the window")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--scrape-s", type=float, default=5.0, help="seconds between /metrics scrapes during a cell")
    p.add_argument("--design", choices=["servers", "toggle"], default="servers",
                   help="two servers suspended in turn, or one server whose counting an admin switches per block")
    p.add_argument("--blocks", type=int, default=40, help="--design toggle: blocks (a multiple of 4: ABBA groups)")
    p.add_argument("--block-s", type=float, default=10.0, help="--design toggle: seconds per block")
    p.add_argument("--pinned", action="store_true", help="--design toggle: the servers' settings of --design servers "
                   "(--threads 1, --max-batch-size 16) instead of `make serve`'s")
    p.add_argument("--output", default="runs/expert_load_overhead.json")
    p.add_argument("--log-dir", default="runs/expert_load_overhead")
    p.add_argument("--resummarize", metavar="FILE", help="--design toggle: recompute the summary of a result file "
                   "from its cells (in place) and exit")
    args = p.parse_args(argv)
    if args.resummarize:
        path = Path(args.resummarize)
        res = json.loads(path.read_text())
        if res.get("design") != "toggle":
            p.error(f"--resummarize: {path} is not a --design toggle result")
        for stale in ("ratio_on_off_per_group", "cpu_ratio_per_group"):
            res.pop(stale, None)
        path.write_text(json.dumps(res | summary(res["cells"]), indent=2) + "\n")
        print(f"rewrote {path}")
        return 0
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = log_dir / "prompts.json"
    prompts_file.write_text(json.dumps(prompts(64)))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    common = ["--max-batch-size", "16", "--max-queue", "256"]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if args.engine == "vllm":
        common += ["--engine", "vllm", "--dtype", "float32", "--max-model-len", "512"]
        env = vllm_env(0, 1)
    else:
        common += ["--threads", "1"]
    if args.design == "toggle":
        if args.engine != "builtin":
            p.error("--design toggle needs --engine builtin: the vLLM engine compiles the counting into its graph")
        if args.blocks < 4 or args.blocks % 4:
            p.error(f"--blocks must be a positive multiple of 4 (ABBA groups), got {args.blocks}")
        result = toggled(args, common, env, prompts_file, log_dir, tokenizer)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nbuiltin, {args.clients} clients, one server, {args.blocks} blocks of {args.block_s:g} s: on/off "
              f"tokens/s per ABBA group median {result['ratio_median']:.4f} (quartiles {result['ratio_q25_q75'][0]:.4f}"
              f"-{result['ratio_q25_q75'][1]:.4f}), pooled {result['ratio_pooled']:.4f} (95% CI "
              f"{result['ratio_pooled_ci95']}); per CPU second median {result['cpu_ratio_median']:.4f}, pooled "
              f"{result['cpu_ratio_pooled']:.4f}")
        print(f"wrote {out}")
        return 0
    servers: dict[str, ManagedServer] = {}
    try:
        for name, flag in (("on", []), ("off", ["--no-expert-load-metrics"])):
            servers[name] = ManagedServer(args.model, args=common + flag, env=env,
                                          log_path=log_dir / f"{args.engine}-{name}.log").wait_ready(900)
        pids = [s.pid for s in servers.values()]
        on_metrics = httpx.get(servers["on"].url + "/metrics").text
        off_metrics = httpx.get(servers["off"].url + "/metrics").text
        assert "varmoe_expert_load_imbalance" in on_metrics and "varmoe_expert_load" not in off_metrics
        runs: dict[str, list[float]] = {"on": [], "off": []}
        per_cpu: dict[str, list[float]] = {"on": [], "off": []}  # generated tokens per CPU second (tree)
        per_worker_cpu: dict[str, list[float]] = {"on": [], "off": []}  # ... of the vLLM worker alone
        for name in ("on", "off"):  # warm-up: first requests of every shape
            only_running([servers[name].pid], pids)
            try:
                locust_load(servers[name].url, args.clients, argparse.Namespace(new_tokens=args.new_tokens, run_time=10,
                                                                                warmup=0.5),
                            prompts_file, log_dir, f"warmup-{name}", tokenizer)
            except RuntimeError as exc:
                print(f"warm-up {name}: {exc}", flush=True)
        for rep in range(args.repeats):
            for name in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                only_running([servers[name].pid], pids)
                stop = threading.Event()
                cpu0, tok0 = tree_cpu(servers[name].pid), generated(servers[name].url)
                t = scraper(servers[name].url, args.scrape_s, stop)
                try:
                    tps = locust_load(servers[name].url, args.clients, args, prompts_file, log_dir, f"{name}",
                                      tokenizer)["tokens_per_s"]
                except RuntimeError as exc:  # too few completions in the window (a loaded machine): no value
                    print(f"repeat {rep} {name}: {exc}", flush=True)
                    tps = None
                finally:
                    stop.set()
                    t.join()
                cpu1, tok1 = tree_cpu(servers[name].pid), generated(servers[name].url)
                per_cpu[name].append((tok1 - tok0) / max(cpu1[0] - cpu0[0], 1e-9))
                per_worker_cpu[name].append((tok1 - tok0) / (cpu1[1] - cpu0[1]) if cpu1[1] > cpu0[1] else None)
                runs[name].append(tps)
                print(f"repeat {rep} {args.engine} metrics {name:3s} {tps if tps is None else round(tps, 1)} tok/s, "
                      f"{per_cpu[name][-1]:.1f} tok per CPU s", flush=True)
    finally:
        if servers:
            only_running([s.pid for s in servers.values()], [s.pid for s in servers.values()])
        for s in servers.values():
            s.stop()
    # pairs of one repeat where both cells have a value
    ratios = [round(a / b, 4) for a, b in zip(runs["on"], runs["off"]) if a is not None and b is not None]
    if not ratios:
        raise SystemExit("no repeat gave both cells a value")
    valid = {k: [x for x in v if x is not None] for k, v in runs.items()}
    result = {"engine": args.engine, "model": args.model, "clients": args.clients, "new_tokens": args.new_tokens,
              "run_time_s": args.run_time, "repeats": args.repeats, "scrape_s": args.scrape_s,
              "tokens_per_s": runs, "median_tokens_per_s": {k: statistics.median(v) for k, v in valid.items()},
              "ratio_on_off_per_repeat": ratios, "ratio_median": statistics.median(ratios),
              "ratio_min": min(ratios), "ratio_max": max(ratios),
              "ratio_of_medians": statistics.median(valid["on"]) / statistics.median(valid["off"]), "goal": 0.99,
              "tokens_per_cpu_s": per_cpu, "tokens_per_worker_cpu_s": per_worker_cpu}
    cpu_ratios = [round(a / b, 4) for a, b in zip(per_cpu["on"], per_cpu["off"])]
    result |= {"cpu_ratio_on_off_per_repeat": cpu_ratios, "cpu_ratio_median": statistics.median(cpu_ratios),
               "cpu_ratio_min": min(cpu_ratios), "cpu_ratio_max": max(cpu_ratios)}
    worker = [round(a / b, 4) for a, b in zip(per_worker_cpu["on"], per_worker_cpu["off"]) if a and b]
    if worker:
        result |= {"worker_cpu_ratio_on_off_per_repeat": worker, "worker_cpu_ratio_median": statistics.median(worker)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.engine}, {args.clients} clients: on {result['median_tokens_per_s']['on']:.1f} tok/s, off "
          f"{result['median_tokens_per_s']['off']:.1f} tok/s; on/off per repeat {ratios} (median "
          f"{result['ratio_median']:.3f}, range {result['ratio_min']:.3f}-{result['ratio_max']:.3f})")
    print(f"generated tokens per CPU second, on/off per repeat {cpu_ratios} (median {result['cpu_ratio_median']:.3f}, "
          f"range {result['cpu_ratio_min']:.3f}-{result['cpu_ratio_max']:.3f})"
          + (f"; vLLM worker only: {worker} (median {result['worker_cpu_ratio_median']:.3f})" if worker else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes that may import this file
    raise SystemExit(main())
