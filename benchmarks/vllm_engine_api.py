"""vLLM's two engine front ends, without HTTP: a synchronous `LLMEngine` stepped from a thread (how
`varmoe serve --engine vllm` drives vLLM, server/vllm_engine.py) against `AsyncLLM` in an asyncio
loop (how vLLM's OpenAI server drives it), generated tokens/s at 1 / 4 / 16 clients.

Both run the same model (plain vLLM, no VAR code), the same greedy requests (24-token prompts, 64
new tokens, EOS ignored, no detokenization) and the same closed-loop clients, written as asyncio
tasks in both: in `sync` they hand each request to an engine thread and get its end back through
`loop.call_soon_threadsafe` (the server's hand-off, without its HTTP side), in `async` they await
`AsyncLLM.generate`. Each repeat starts one process per front end (order alternating between
repeats) that runs every client count (warm-up, then `--run-time` seconds); the ratio sync / async
is taken per repeat and client count, and its median is reported.

Run (vLLM environment; one compute thread on core 0, as benchmarks/vllm_throughput.py):
    HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m benchmarks vllm_engine_api --repeats 3 --run-time 15 \
        --output benchmarks/results/vllm_engine_api.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.vllm_throughput import vllm_env
from var_moe.loading import REFERENCE_MODEL_DIR
from var_moe.timing import rotated

FRONT_ENDS = ("sync", "async")
NEW_TOKENS = 64


def _prompts() -> list[list[int]]:
    return [[(7 * i + j) % 1000 + 5 for j in range(24)] for i in range(64)]


def _params():
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)


async def _load(generate, clients: int, seconds: float) -> float:
    """Closed-loop clients for `seconds`; generated tokens/s."""
    prompts, done, ids = _prompts(), [0], iter(range(1 << 62))
    stop_at = time.monotonic() + seconds

    async def client(c: int) -> None:
        i = c
        while time.monotonic() < stop_at:
            await generate(f"r{next(ids)}", prompts[i % len(prompts)])
            done[0] += NEW_TOKENS
            i += clients

    t0 = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return done[0] / (time.monotonic() - t0)


async def _sweep(generate, args) -> dict[int, float]:
    """Tokens/s per client count, each measured after a warm-up of its own."""
    out = {}
    for c in args.clients:
        await _load(generate, c, args.warmup)
        out[c] = await _load(generate, c, args.run_time)
    return out


async def _sync_child(args) -> dict[int, float]:
    """LLMEngine on a thread of its own, as server/vllm_engine.py steps it."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(model=args.model, seed=0, max_num_seqs=16, disable_log_stats=True))
    loop, cond, pending, waiting = asyncio.get_running_loop(), threading.Condition(), [], {}
    params, stopping = _params(), [False]

    def run() -> None:
        flights: set[str] = set()
        while True:
            with cond:
                while not pending and not flights and not stopping[0]:
                    cond.wait()
                if stopping[0] and not flights:
                    return
                admit = list(pending)
                pending.clear()
            for rid, prompt in admit:
                engine.add_request(rid, {"prompt_token_ids": prompt}, params)
                flights.add(rid)
            for out in engine.step():
                if out.finished:
                    flights.discard(out.request_id)
                    loop.call_soon_threadsafe(waiting.pop(out.request_id).set_result, None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    async def generate(rid: str, prompt: list[int]) -> None:
        fut = loop.create_future()
        with cond:
            waiting[rid] = fut
            pending.append((rid, prompt))
            cond.notify_all()
        await fut

    try:
        return await _sweep(generate, args)
    finally:
        with cond:
            stopping[0] = True
            cond.notify_all()
        thread.join(30)
        engine.engine_core.shutdown()


async def _async_child(args) -> dict[int, float]:
    """AsyncLLM in this event loop, as vLLM's OpenAI server runs it."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=args.model, seed=0, max_num_seqs=16, disable_log_stats=True))
    params = _params()

    async def generate(rid: str, prompt: list[int]) -> None:
        async for _ in engine.generate({"prompt_token_ids": prompt}, params, rid):
            pass

    try:
        return await _sweep(generate, args)
    finally:
        engine.shutdown()


def _child(args) -> int:
    run = _sync_child if args.child == "sync" else _async_child
    tps = asyncio.run(run(args))
    print("RESULT " + json.dumps({str(c): v for c, v in tps.items()}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    p.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run-time", type=float, default=15.0, help="seconds of load per client count")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--core", type=int, default=0, help="the compute thread's core (VLLM_CPU_OMP_THREADS_BIND)")
    p.add_argument("--child", choices=FRONT_ENDS, help=argparse.SUPPRESS)
    p.add_argument("--output", default="runs/vllm_engine_api.json")
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if args.repeats < 1 or args.run_time <= 0:
        p.error("--repeats must be >= 1 and --run-time > 0")
    env = {**os.environ, **vllm_env(args.core, kv_gb=2)}
    flags = ["--model", args.model, "--clients", ",".join(map(str, args.clients)), "--run-time", str(args.run_time),
             "--warmup", str(args.warmup)]
    runs: dict[str, list[dict[str, float]]] = {f: [] for f in FRONT_ENDS}
    for r in range(args.repeats):
        for front in rotated(FRONT_ENDS, r):
            proc = subprocess.run([sys.executable, "-m", "benchmarks", "vllm_engine_api", "--child", front, *flags],
                                  env=env, capture_output=True, text=True, timeout=600)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"vllm_engine_api: the {front} run failed (exit {proc.returncode})")
            runs[front].append(json.loads(line[len("RESULT "):]))
            print(f"repeat {r + 1} {front:5s} " + "  ".join(f"{c} clients {v:7.1f} tok/s" for c, v in runs[front][-1].items()),
                  flush=True)
    ratios = {str(c): [s[str(c)] / a[str(c)] for s, a in zip(runs["sync"], runs["async"])] for c in args.clients}
    result = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "tokens_per_s": runs,
              "sync_over_async": ratios, "median_sync_over_async": {c: statistics.median(v) for c, v in ratios.items()}}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for c, v in ratios.items():
        print(f"{c:>3} clients: sync / async median {statistics.median(v):.3f} (per repeat {', '.join(f'{x:.2f}' for x in v)})")
    print(f"wrote {out}")
    return 0
