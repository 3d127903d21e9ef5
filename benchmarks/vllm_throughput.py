"""VAR on vLLM, side by side: generated tokens/s at 1 / 4 / 16 clients of plain vLLM, `varmoe serve
--engine vllm` in baseline and in VAR mode, and the builtin engine (`varmoe serve`), in one run.

Load: the same Locust completions load as benchmarks/server_throughput.py (closed-loop users,
greedy `POST /v1/completions`, `max_tokens` = --new-tokens, the same prompts; tokens/s counted
inside the load window from Locust's per-request log). Contenders:

- `vllm`: plain vLLM, `python -m vllm.entrypoints.openai.api_server` on the same model;
- `vllm_engine_baseline` / `vllm_engine_var`: one `varmoe serve --engine vllm` server, every request
  pinned to the mode (`"var": false|true`), so each cell runs one mode (no time-slicing);
- `builtin`: `varmoe serve --max-batch-size 16` in baseline mode, in the main environment
  (`--builtin-python`), the reference engine.

One compute thread each: vLLM's engine processes are pinned to `--core` (VLLM_CPU_OMP_THREADS_BIND),
the builtin engine gets `--threads 1`. With `--isolate` (the default) the servers not under load are
suspended (SIGSTOP of their whole process tree, SIGCONT before their turn): an idle vLLM worker
polls its queues and took ~40% of a core on this 2-core machine, which every other contender paid. All servers stay up; each repeat runs every contender at
every client count once (interleaved), and the median of the repeats is reported with every
repeat's value, and the ratios to plain vLLM inside the run. The contenders' order rotates from
one repeat to the next. With `--pin-rest CORE` the benchmark
and everything it starts (vLLM's API-server and engine-core processes, the varmoe server's HTTP
side, Locust) run on that core, so the compute core holds only the compute thread: vLLM's
engine-core process polls its queues busily, and when the scheduler put it on the compute core
it took time from the worker, which made cells swing by ~25%. The builtin engine then runs
wholly on the compute core (`taskset`), its HTTP side included. Goals: baseline >= 0.95x
plain vLLM, VAR >= 0.90x, at every client count.

Run (vLLM environment):
    .venv-vllm/bin/python -m benchmarks vllm_throughput --repeats 3 --run-time 20 \
        --builtin-python .venv/bin/python --output benchmarks/results/vllm_throughput.json
It also reports, per cell, the CPU seconds each server spent outside its compute thread per 1,000
generated tokens (all its processes: cpu_time.py), with the breakdown per process. `--dtype`
(default auto: no dtype given, each server picks, as `make serve-vllm` runs) applies to all servers.
Results go to docs/BENCHMARKS.md (section "VAR on vLLM").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from analysis_jobs.server_process import REPO_ROOT, ManagedServer, free_port
from benchmarks.cpu_time import outside_compute, per_1000_tokens, snapshot
from benchmarks.server_throughput import locust_load, prompts
from var_moe.loading import REFERENCE_MODEL_DIR
from var_moe.timing import rotated


def vllm_env(core: int, kv_gb: int) -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_CPU_KVCACHE_SPACE": str(kv_gb), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def start(cmd: list[str], env: dict, log: Path, ready_path: str, timeout_s: float = 900) -> tuple[subprocess.Popen, str]:
    """Start a server process (cmd gets --host/--port appended) and wait until `ready_path` answers 200."""
    port = free_port()
    proc = subprocess.Popen(cmd + ["--host", "127.0.0.1", "--port", str(port)], env={**os.environ, **env},
                            cwd=REPO_ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise TimeoutError(f"{cmd[:4]} did not come up in {timeout_s:.0f} s")


def _tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def only_running(pids: list[int], all_pids: list[int]) -> None:
    """Resume the process trees of `pids`, suspend every other server's tree (children first)."""
    import psutil

    for pid in all_pids:
        if pid in pids:
            continue
        for proc in reversed(_tree(pid)):
            try:
                proc.suspend()
            except psutil.NoSuchProcess:
                pass
    for pid in pids:
        for proc in _tree(pid):
            try:
                proc.resume()
            except psutil.NoSuchProcess:
                pass
    time.sleep(0.5)  # let resumed processes get back to their loops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--run-time", type=int, default=20, help="seconds of load per cell")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds after spawning left out of the window")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--core", type=int, default=0, help="the core vLLM's compute thread is pinned to")
    p.add_argument("--kv-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE of each vLLM server")
    p.add_argument("--builtin-python", default="", help="python of the main environment for the builtin engine "
                                                        "(empty: skip the builtin engine)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="suspend the servers that are not under load (default on)")
    p.add_argument("--pin-rest", type=int, default=None, metavar="CORE",
                   help="run everything but the compute threads on this core (default: no pinning)")
    p.add_argument("--dtype", default="auto", help="dtype of every server (auto: none given, each server picks, as "
                                                   "`make serve-vllm` runs; vLLM takes bfloat16 on CPUs with bf16)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="one more `varmoe serve --engine vllm` server with these extra flags, run in both modes as "
                        "contenders vllm_engine_NAME_baseline / _var (e.g. noload=--no-expert-load-metrics; a server "
                        "without VAR tables runs baseline mode only); repeatable")
    p.add_argument("--output", default="runs/vllm_throughput.json")
    p.add_argument("--log-dir", default="runs/vllm_throughput")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    variants = {}
    for v in args.variant:
        name, sep, flags = v.partition("=")
        if not sep or not name.isidentifier():
            p.error(f"--variant {v!r}: expected NAME=FLAGS, NAME a plain identifier")
        variants[name] = flags.split()
    if args.pin_rest is not None:
        if args.pin_rest == args.core:
            p.error("--pin-rest must differ from --core")
        os.sched_setaffinity(0, {args.pin_rest})  # inherited by every process started from here
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = log_dir / "prompts.json"
    prompts_file.write_text(json.dumps(prompts(64)))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    env = vllm_env(args.core, args.kv_gb)
    max_len = 512
    procs: list = []
    dtype = [] if args.dtype == "auto" else ["--dtype", args.dtype]
    try:
        plain, plain_url = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
                                  "--served-model-name", "plain", *dtype, "--max-model-len", str(max_len),
                                  "--max-num-seqs", "16", "--disable-log-stats"], env, log_dir / "vllm.log", "/v1/models")
        procs.append(plain)
        ours = ManagedServer(args.model, args=["--engine", "vllm", *dtype, "--max-model-len", str(max_len),
                                               "--max-batch-size", "16", "--max-queue", "256"],
                             env=env, log_path=log_dir / "varmoe_vllm.log").wait_ready(900)
        procs.append(ours)
        contenders = {"vllm": (plain_url, "plain", None), "vllm_engine_baseline": (ours.url, None, False),
                      "vllm_engine_var": (ours.url, None, True)}
        server_pid = {"vllm": plain.pid, "vllm_engine_baseline": ours.pid, "vllm_engine_var": ours.pid}
        if args.builtin_python:  # the main environment's python: the builtin engine's own transformers
            pin = ["taskset", "-c", str(args.core)] if args.pin_rest is not None else []
            builtin, builtin_url = start(pin + [args.builtin_python, "-m", "var_moe.cli", "serve", "--model", args.model, *dtype,
                                          "--threads", "1", "--max-batch-size", "16", "--max-queue", "256",
                                          "--no-var-on-start", "--log-level", "warning"],
                                         {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, log_dir / "builtin.log",
                                         "/readyz", 300)
            procs.append(builtin)
            contenders["builtin"] = (builtin_url, None, False)
            server_pid["builtin"] = builtin.pid
        for vname, flags in variants.items():
            extra = ManagedServer(args.model, args=["--engine", "vllm", *dtype, "--max-model-len", str(max_len),
                                                    "--max-batch-size", "16", "--max-queue", "256", *flags],
                                  env=env, log_path=log_dir / f"varmoe_vllm_{vname}.log").wait_ready(900)
            procs.append(extra)
            # a variant that serves no tables (e.g. --model of a folder without var/: vLLM's own model
            # class behind our server) runs in baseline mode only
            can_var = httpx.get(f"{extra.url}/readyz", timeout=10).json().get("var_available", True)
            for mode, var in (("baseline", False), ("var", True))[: 2 if can_var else 1]:
                contenders[f"vllm_engine_{vname}_{mode}"] = (extra.url, None, var)
                server_pid[f"vllm_engine_{vname}_{mode}"] = extra.pid
        all_pids = sorted(set(server_pid.values()))

        def turn(name: str) -> None:
            if args.isolate:
                only_running([server_pid[name]], all_pids)

        for name, (url, model, var) in contenders.items():  # warm-up: first requests of every shape
            turn(name)
            try:
                r = locust_load(url, 16, argparse.Namespace(new_tokens=args.new_tokens, run_time=10, warmup=0.5),
                                prompts_file, log_dir, f"warmup-{name}", tokenizer, model=model, var=var)
                print(f"warm-up {name}: {r['tokens_per_s']:.1f} tok/s", flush=True)
            except RuntimeError as exc:  # too few requests in a short window is fine for a warm-up
                print(f"warm-up {name}: {exc}", flush=True)
        runs: dict = {name: {c: [] for c in levels} for name in contenders}
        names = list(contenders)
        for rep in range(args.repeats):
            # the contenders' order rotates with the repeat: the machine's speed drifts over tens of
            # seconds, and a fixed order would hand one contender the same slot of every drift
            order = rotated(names, rep)
            for c in levels:
                for name in order:
                    url, model, var = contenders[name]
                    turn(name)
                    before = snapshot(server_pid[name])
                    r = locust_load(url, c, args, prompts_file, log_dir, f"{name}-{c}", tokenizer, model=model, var=var)
                    r["cpu"] = outside_compute(before, snapshot(server_pid[name]))
                    r["cpu_per_1k_tokens"] = per_1000_tokens(r["cpu"], r["tokens_total"])
                    runs[name][c].append(r)
                    print(f"repeat {rep} clients {c:2d} {name:22s} {r['tokens_per_s']:8.1f} tok/s, outside the compute "
                          f"thread {r['cpu_per_1k_tokens']['outside_s_per_1k']:.3f} CPU s / 1k tokens", flush=True)
    finally:
        if args.isolate and procs:
            only_running([p.pid for p in procs], [p.pid for p in procs])  # resumed, so they can stop
        for proc in reversed(procs):
            if isinstance(proc, ManagedServer):
                proc.stop()
            else:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    med = {n: {c: statistics.median(r["tokens_per_s"] for r in rs) for c, rs in by.items()} for n, by in runs.items()}
    ratios = {n: {c: round(med[n][c] / med["vllm"][c], 3) for c in levels} for n in med if n != "vllm"}
    # ratio per repeat (same repeat, same client count: the closest pairs in time)
    paired = {n: {c: [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(runs[n][c], runs["vllm"][c])]
                  for c in levels} for n in runs if n != "vllm"}
    # CPU seconds outside the compute thread per 1,000 generated tokens (median of repeats; breakdown per process kind)
    outside = {n: {c: statistics.median(r["cpu_per_1k_tokens"]["outside_s_per_1k"] for r in rs) for c, rs in by.items()}
               for n, by in runs.items()}
    outside_ratio = {n: {c: round(outside[n][c] / max(outside["vllm"][c], 1e-9), 3) for c in levels} for n in outside
                     if n != "vllm"}
    # the worker's compute thread (the model's forward and the per-step host work on it)
    compute = {n: {c: statistics.median(r["cpu_per_1k_tokens"]["compute_s_per_1k"] for r in rs) for c, rs in by.items()}
               for n, by in runs.items()}
    compute_ratio = {n: {c: round(compute[n][c] / max(compute["vllm"][c], 1e-9), 3) for c in levels} for n in compute
                     if n != "vllm"}
    result = {"model": args.model, "dtype": args.dtype, "kv_gb": args.kv_gb, "variants": variants,
              "compute_thread_cpu_s_per_1k_tokens": compute, "compute_thread_ratio_to_vllm": compute_ratio,
              "outside_compute_cpu_s_per_1k_tokens": outside, "outside_compute_ratio_to_vllm": outside_ratio,
              "cpu_per_repeat": {n: {c: [r["cpu_per_1k_tokens"] for r in rs] for c, rs in by.items()}
                                 for n, by in runs.items()}, "new_tokens": args.new_tokens, "run_time_s": args.run_time, "repeats": args.repeats,
              "core": args.core, "pin_rest": args.pin_rest, "isolate": args.isolate, "endpoint": "/v1/completions", "median_tokens_per_s": med, "ratio_to_vllm": ratios,
              "ratio_to_vllm_per_repeat": paired,
              "runs": {n: {c: [r["tokens_per_s"] for r in rs] for c, rs in by.items()} for n, by in runs.items()},
              "goals": {"vllm_engine_baseline": 0.95, "vllm_engine_var": 0.90}}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'contender':22s} " + " ".join(f"{c:>16d}" for c in levels))
    for n in med:
        cells = " ".join(f"{med[n][c]:8.1f} ({ratios.get(n, {}).get(c, 1.0):.2f}x)" for c in levels)
        print(f"{n:22s} {cells}")
    print("\nCPU s outside the compute thread per 1,000 tokens (x plain vLLM)")
    for n in outside:
        cells = " ".join(f"{outside[n][c]:8.3f} ({outside_ratio.get(n, {}).get(c, 1.0):.2f}x)" for c in levels)
        print(f"{n:22s} {cells}")
    print("\nCPU s of the worker's compute thread per 1,000 tokens (x plain vLLM)")
    for n in compute:
        cells = " ".join(f"{compute[n][c]:8.3f} ({compute_ratio.get(n, {}).get(c, 1.0):.2f}x)" for c in levels)
        print(f"{n:22s} {cells}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes that may import this file
    raise SystemExit(main())
