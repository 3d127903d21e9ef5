"""Generated tokens/s of the server at 1, 4 and 16 concurrent clients, next to the same model's
in-process `generate()` at batch 1 and at the server's batch size, and `transformers serve
--continuous-batching` on the same model under the same load, all in one run.

Load (default `--load locust`): for each server and client count, Locust runs headless in a
subprocess started by `loadtests.run.launch_locust` (`locust -f benchmarks/locust_completions.py
--headless -u N -r N -t Ts ...`)
with N closed-loop users posting greedy `POST /v1/completions` requests (fixed prompts: the first
lines of var_moe's source files; `max_tokens` = --new-tokens, temperature 0, no wait between
requests). tokens/s = usage.completion_tokens of the requests that complete inside the load window
/ the window's length. The window runs from the first completion at least --warmup seconds after
all users have spawned to the last completion before Locust starts stopping; counting the tokens
completed in (first, last] makes the window begin and end on completions, so a batched server is
credited exactly the batches that finished inside it. `--load httpx` keeps the earlier method (a
pool of httpx threads, each sending --requests-per-client requests to /v1/generate, or
/v1/completions for transformers serve; tokens / wall time of the whole load).
In-process `generate()` runs greedy left-padded batches with no early stop for at least
--in-process-s seconds. All contenders get one torch thread (`--threads`), so the numbers compare
the serving, not the cores. Contenders are interleaved (each repeat runs every one of them once)
and the median is reported, because the machine is shared and its load drifts during a run.

Run:  python -m benchmarks server_throughput                       (reference model, Locust load)
      python -m benchmarks server_throughput --run-time 20 --repeats 3 --output benchmarks/results/server_throughput.json
      python -m benchmarks server_throughput --load httpx          (the earlier httpx-thread load)
      python -m benchmarks server_throughput --model DIR --skip-cb --output runs/bench.json
Results go to docs/BENCHMARKS.md (section "Server") with the command that produced them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from analysis_jobs.server_process import REPO_ROOT, ManagedServer, free_port
from loadtests.run import headless_command, launch_locust
from var_moe.loading import REFERENCE_MODEL_DIR, load_model
from var_moe.timing import rotated


def prompts(n: int) -> list[str]:
    files = sorted((REPO_ROOT / "var_moe").rglob("*.py"))
    heads = ["".join(f.read_text().splitlines(True)[:3])[:160] for f in files]
    return [h for h in heads if h.strip()][:n]


LOCUSTFILE = Path(__file__).resolve().with_name("locust_completions.py")
_cells = itertools.count(1)


def load_window(log: Path, warmup_s: float, tokenizer=None) -> dict:
    """tokens/s inside the load window of one Locust run, from its per-request log (see module doc)."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    marks = {r["event"]: r["t"] for r in rows if "event" in r}
    reqs = [r for r in rows if "event" not in r]
    ok = [r for r in reqs if r["status"] == 200]
    for r in ok:
        if r.get("tokens") is None:
            r["tokens"] = len(tokenizer(r.get("text", ""), add_special_tokens=False)["input_ids"]) if tokenizer else 0
    if "spawning_complete" not in marks:
        raise RuntimeError(f"{log}: Locust never finished spawning users")
    begin = marks["spawning_complete"] + warmup_s
    end = marks.get("test_stopping", float("inf"))
    ends = sorted(r["t_end"] for r in ok if begin <= r["t_end"] <= end)
    if len(ends) < 2:
        raise RuntimeError(f"{log}: fewer than 2 requests completed inside the load window "
                           f"({len(ok)} ok, {len(reqs) - len(ok)} failed)")
    t_a, t_b = ends[0], ends[-1]
    inside = [r for r in ok if t_a < r["t_end"] <= t_b]
    tokens = sum(r["tokens"] for r in inside)
    lat = sorted(r["t_end"] - r["t_start"] for r in inside)
    return {"requests": len(inside), "tokens": tokens, "wall_s": t_b - t_a, "tokens_per_s": tokens / (t_b - t_a),
            "latency_p50_s": round(lat[len(lat) // 2], 4), "requests_total": len(reqs),
            "tokens_total": sum(r["tokens"] for r in ok),  # the whole run's, for CPU time per token
            "failed_total": len(reqs) - len(ok)}


def locust_load(url: str, clients: int, args, prompts_file: Path, log_dir: Path, name: str, tokenizer,
                model: str | None = None, var: bool | None = None) -> dict:
    """One headless Locust run of `clients` closed-loop users against `url`; returns the window's tokens/s."""
    log_dir.mkdir(parents=True, exist_ok=True)
    name = f"{next(_cells):03d}-{name}"  # one set of files per run
    log = log_dir / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "VARMOE_BL_PROMPTS": str(prompts_file), "VARMOE_BL_LOG": str(log),
           "VARMOE_BL_MAX_TOKENS": str(args.new_tokens)}
    env.pop("VARMOE_BL_MODEL", None)
    env.pop("VARMOE_BL_VAR", None)
    if model is not None:
        env["VARMOE_BL_MODEL"] = model
    if var is not None:
        env["VARMOE_BL_VAR"] = "true" if var else "false"
    cmd = headless_command(LOCUSTFILE, url, clients, clients, args.run_time, 120, log_dir / name)
    with open(log_dir / f"{name}.stderr", "wb") as err:
        rc = launch_locust(cmd, env, args.run_time + 120 + 90, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO_ROOT)
    if rc != 0:
        raise RuntimeError(f"locust ({name}) exited {rc}: {(log_dir / f'{name}.stderr').read_text()[-1500:]}")
    return {"clients": clients, **load_window(log, args.warmup, tokenizer)}


def run_load(send, clients: int, requests_per_client: int, texts: list[str]) -> dict:
    """`clients` threads, each sending `requests_per_client` requests back to back; send(text) -> tokens."""

    def client(c: int) -> int:
        return sum(send(texts[(c * 7 + i) % len(texts)]) for i in range(requests_per_client))

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * requests_per_client, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall}


def varmoe_sender(url: str, new_tokens: int, var: bool):
    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

    def send(text: str) -> int:
        r = http.post(url + "/v1/generate", json={"prompt": text, "max_new_tokens": new_tokens, "var": var})
        r.raise_for_status()
        return r.json()["generated_tokens"]

    return send


def cb_sender(url: str, model: str, new_tokens: int, tokenizer):
    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

    def send(text: str) -> int:
        r = http.post(url + "/v1/completions", json={"model": model, "prompt": text, "max_tokens": new_tokens,
                                                     "temperature": 0})
        r.raise_for_status()
        body = r.json()
        usage = body.get("usage") or {}
        return int(usage.get("completion_tokens") or len(tokenizer(body["choices"][0]["text"])["input_ids"]))

    return send


def in_process(model, tok, texts: list[str], batch: int, new_tokens: int, repeats: int,
               min_s: float = 0.0) -> dict:
    """Plain `generate()` on left-padded batches (greedy, no early stop), the reference point."""
    tok.padding_side = "left"
    total, t0 = 0, time.perf_counter()
    for r in range(1000):  # bounded; stops after `repeats` calls and at least min_s seconds
        if r >= repeats and time.perf_counter() - t0 >= min_s:
            break
        chunk = [texts[(r * batch + i) % len(texts)] for i in range(batch)]
        enc = tok(chunk, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        total += (out.shape[1] - enc["input_ids"].shape[1]) * batch
    wall = time.perf_counter() - t0
    return {"batch": batch, "tokens": total, "wall_s": wall, "tokens_per_s": total / wall}


def start_cb_server(model: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = ["transformers", "serve", model, "--continuous-batching", "--cb-num-blocks", "64",
           "--cb-max-batch-tokens", "512", "--attn-implementation", "sdpa", "--host", "127.0.0.1",
           "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited: {log.read_text()[-2000:]}")
        try:
            httpx.get(url + "/v1/models", timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("transformers serve did not come up in 180 s")


def summarize(results: dict, levels: list[int]) -> dict:
    """The three goals: overhead at 1 client, 16-client scaling, server vs transformers serve CB."""
    out: dict = {}
    base1 = results["in_process"][1]["tokens_per_s"]
    cb = {k: v for k, v in results["transformers_cb"].items() if k != "error"}
    for mode, by_level in results["server"].items():
        lo, hi = by_level[levels[0]]["tokens_per_s"], by_level[levels[-1]]["tokens_per_s"]
        out[mode] = {
            "overhead_vs_generate_batch1": round(1 - lo / base1, 3),  # goal <= 0.10
            f"scaling_{levels[-1]}_vs_{levels[0]}_clients": round(hi / lo, 2),  # goal >= 4
            "vs_transformers_cb": {c: round(by_level[c]["tokens_per_s"] / cb[c]["tokens_per_s"], 2)
                                   for c in levels if c in cb},  # goal >= 1
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="the server's max batch size")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--load", choices=("locust", "httpx"), default="locust",
                   help="locust: headless Locust users on /v1/completions (default); httpx: the earlier thread pool")
    p.add_argument("--run-time", type=int, default=20, help="locust: seconds of load per cell")
    p.add_argument("--warmup", type=float, default=3.0, help="locust: seconds after spawning left out of the window")
    p.add_argument("--requests-per-client", type=int, default=6, help="httpx: requests each client sends per load level")
    p.add_argument("--in-process-s", type=float, default=4.0, help="in-process generate(): seconds per measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="median of this many runs per measurement")
    p.add_argument("--modes", default="baseline,var", help="server modes to measure (var needs VAR tables)")
    p.add_argument("--skip-cb", action="store_true", help="skip transformers serve --continuous-batching")
    p.add_argument("--output", default="runs/server_throughput.json")
    p.add_argument("--log-dir", default="runs/server_throughput_locust",
                   help="locust: per-request logs and Locust CSVs of every cell, and the server logs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.clients.split(",")]
    texts = prompts(64)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_name = Path(args.model).resolve()
    model_name = str(model_name.relative_to(REPO_ROOT)) if model_name.is_relative_to(REPO_ROOT) else args.model
    results: dict = {"model": model_name, "new_tokens": args.new_tokens, "threads": args.threads,
                     "batch_size": args.batch_size, "load": args.load, "repeats": args.repeats,
                     "server": {}, "in_process": {}, "transformers_cb": {}}
    if args.load == "locust":
        results.update(run_time_s=args.run_time, warmup_s=args.warmup, endpoint="/v1/completions")
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = log_dir / "prompts.json"
    prompts_file.write_text(json.dumps(texts))

    model, tok = load_model(args.model, dtype="float32")
    # contender name -> (where in results, function returning one measurement)
    runs: dict[tuple, object] = {}
    for b in (1, args.batch_size):
        in_process(model, tok, texts, b, 4, 1)  # warm-up
        runs[("in_process", b)] = lambda b=b: in_process(model, tok, texts, b, args.new_tokens, max(1, 4 // b),
                                                         args.in_process_s)
    srv = ManagedServer(args.model, args=["--max-batch-size", str(args.batch_size), "--max-queue", "256"],
                        threads=args.threads, log_path=log_dir / "server.log").wait_ready(300)
    cb_proc = None
    try:
        var_ok = httpx.get(srv.url + "/readyz").json()["var_available"]
        for mode in args.modes.split(","):
            if mode == "var" and not var_ok:
                print("server: VAR unavailable (no tables); skipping the var mode", flush=True)
                continue
            send = varmoe_sender(srv.url, args.new_tokens, var=(mode == "var"))
            send(texts[0])  # warm-up
            for c in levels:
                if args.load == "locust":
                    runs[("server", mode, c)] = lambda mode=mode, c=c: locust_load(
                        srv.url, c, args, prompts_file, log_dir, f"server-{mode}-{c}", tok, var=(mode == "var"))
                else:
                    runs[("server", mode, c)] = lambda send=send, c=c: run_load(send, c, args.requests_per_client, texts)
        if not args.skip_cb:
            try:
                cb_proc, url = start_cb_server(args.model, args.threads, log_dir / "transformers_serve.log")
                send = cb_sender(url, args.model, args.new_tokens, tok)
                send(texts[0])
                for c in levels:
                    if args.load == "locust":
                        runs[("transformers_cb", c)] = lambda c=c: locust_load(
                            url, c, args, prompts_file, log_dir, f"transformers_cb-{c}", tok, model=args.model)
                    else:
                        runs[("transformers_cb", c)] = lambda send=send, c=c: run_load(send, c, args.requests_per_client,
                                                                                       texts)
            except (RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:
                results["transformers_cb"] = {"error": str(exc)[-500:]}
                print(f"transformers serve: {exc}", flush=True)
        # Interleave: every repeat runs every contender once, in rotating order (var_moe.timing), so load
        # drift on a shared machine hits all alike.
        measured: dict[tuple, list[dict]] = {key: [] for key in runs}
        for rep in range(args.repeats):
            for key in rotated(list(runs), rep):
                measured[key].append(runs[key]())
                print(f"repeat {rep + 1}: {' '.join(map(str, key))}: {measured[key][-1]['tokens_per_s']:.0f} tokens/s",
                      flush=True)
        for key, values in measured.items():
            values.sort(key=lambda r: r["tokens_per_s"])
            mid = dict(values[len(values) // 2])
            mid["repeats_tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in values]
            slot = results[key[0]]
            for part in key[1:-1]:
                slot = slot.setdefault(part, {})
            slot[key[-1]] = mid
    finally:
        srv.stop()
        if cb_proc is not None:
            cb_proc.terminate()
            cb_proc.wait(30)
    results["summary"] = summarize(results, levels)
    print(json.dumps(results["summary"], indent=2))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
