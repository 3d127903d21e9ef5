"""One client, no load generator: per-request latency of plain vLLM vs `varmoe serve --engine vllm`.

The 1-client cells of benchmarks/vllm_throughput.py (Locust, 15-20 s windows) swing by 20% from one
cell to the next, more than the 5% the issue's goal is about. This benchmark asks the narrower
question of what our server's request path costs against vLLM's own API server: one plain HTTP
client sends greedy `/v1/completions` (the same prompt, --new-tokens tokens, no streaming) back to
back, in short blocks of --block requests per contender, with the contenders' order rotated from
block to block and the servers not under test suspended (as vllm_throughput.py's `--isolate`).
Contenders: plain vLLM, and one `varmoe serve --engine vllm` server with every request pinned to
baseline or to VAR (the committed tables). Everything but vLLM's compute thread runs on
`--pin-rest` (as vllm_throughput.py's flag). Reported: the median of each contender's block
medians and the median and geometric mean of per-block-round ratios to plain vLLM (latency ratio
plain / contender: > 1 = faster than plain).

Run (vLLM environment):
    .venv-vllm/bin/python benchmarks/vllm_sequential.py --rounds 15 --json benchmarks/results/vllm_sequential.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_throughput import only_running, start, vllm_env  # noqa: E402

from analysis_jobs.server_process import ManagedServer  # noqa: E402
from var_moe.loading import REFERENCE_MODEL_DIR  # noqa: E402

PROMPT = "The history of the city"


def one(client: httpx.Client, url: str, body: dict, new_tokens: int) -> float:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/completions", json=body, timeout=120)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
    got = r.json()["usage"]["completion_tokens"]
    if got != new_tokens:  # a request that stopped early would look fast
        raise RuntimeError(f"{url}: {got} tokens generated, {new_tokens} asked")
    return dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15, help="block rounds (each: one block per contender)")
    p.add_argument("--block", type=int, default=20, help="requests per block")
    p.add_argument("--warmup", type=int, default=10, help="requests per contender before timing")
    p.add_argument("--core", type=int, default=0, help="the core vLLM's compute thread is pinned to")
    p.add_argument("--pin-rest", type=int, default=1, metavar="CORE", help="everything else runs on this core")
    p.add_argument("--log-dir", default="runs/vllm_sequential")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if min(args.new_tokens, args.rounds, args.block) < 1 or args.warmup < 0:
        p.error("--new-tokens, --rounds and --block must be >= 1, --warmup >= 0")
    if args.pin_rest == args.core:
        p.error("--pin-rest must differ from --core")
    os.sched_setaffinity(0, {args.pin_rest})  # inherited by every process started from here
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = vllm_env(args.core, 2)
    base = {"prompt": PROMPT, "max_tokens": args.new_tokens, "temperature": 0.0}
    plain, plain_url = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
                              "--served-model-name", "plain", "--dtype", "float32", "--max-model-len", "512",
                              "--max-num-seqs", "16", "--disable-log-stats"], env, log_dir / "vllm.log", "/v1/models")
    ours = None
    try:
        ours = ManagedServer(args.model, args=["--engine", "vllm", "--dtype", "float32", "--max-model-len", "512",
                                               "--max-batch-size", "16", "--max-queue", "256"],
                             env=env, log_path=log_dir / "varmoe_vllm.log").wait_ready(900)
        contenders = {"vllm": (plain_url, plain.pid, {**base, "model": "plain"}),
                      "vllm_engine_baseline": (ours.url, ours.pid, {**base, "var": False}),
                      "vllm_engine_var": (ours.url, ours.pid, {**base, "var": True})}
        pids = [plain.pid, ours.pid]
        names = list(contenders)
        blocks: dict[str, list[float]] = {n: [] for n in names}
        with httpx.Client() as client:
            for name, (url, pid, body) in contenders.items():
                only_running([pid], pids)
                for _ in range(args.warmup):
                    one(client, url, body, args.new_tokens)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    url, pid, body = contenders[name]
                    only_running([pid], pids)
                    times = [one(client, url, body, args.new_tokens) for _ in range(args.block)]
                    blocks[name].append(statistics.median(times))
                print(f"round {r}: " + ", ".join(f"{n} {blocks[n][-1] * 1000:.1f} ms" for n in names), flush=True)
        only_running(pids, pids)
    finally:
        if ours is not None:
            only_running([plain.pid, ours.pid], [plain.pid, ours.pid])
            ours.stop()
        plain.terminate()
        plain.wait(60)
    summary = {}
    print(f"\n{'contender':<22}{'median ms':>10}{'x plain (median)':>18}{'x plain (geomean)':>19}{'range':>14}")
    for n in names:
        ratios = [a / b for a, b in zip(blocks["vllm"], blocks[n])]
        summary[n] = {"median_ms": statistics.median(blocks[n]) * 1000, "ratio_median": statistics.median(ratios),
                      "ratio_geomean": statistics.geometric_mean(ratios), "ratio_min": min(ratios),
                      "ratio_max": max(ratios), "ratios": [round(x, 4) for x in ratios]}
        s = summary[n]
        print(f"{n:<22}{s['median_ms']:>10.1f}{s['ratio_median']:>18.3f}{s['ratio_geomean']:>19.3f}"
              f"{s['ratio_min']:>7.2f}-{s['ratio_max']:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"new_tokens": args.new_tokens, "rounds": args.rounds, "block": args.block,
                                               "core": args.core, "pin_rest": args.pin_rest,
                                               "block_median_s": blocks, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
