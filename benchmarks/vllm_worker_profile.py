"""What share of vLLM's worker process VAR's per-step host code takes, by mode, from a sampling profile.

Starts `varmoe serve --engine vllm` on the reference model (one compute thread, as
benchmarks/vllm_throughput.py starts it), finds its vLLM worker process, and for each round and
mode (baseline / VAR requests, alternating) records the worker with py-spy while `--clients`
closed-loop clients send `--requests` greedy requests each (benchmarks/server_throughput.py's
`run_load` and `varmoe_sender`). From each profile it counts the samples inside the model-runner
hook (`rows._runner_prepare_inputs`) and, of those, the hook's own: request modes, tokens, pair
lookup and buffer writes, without vLLM's input preparation that the hook wraps, and the tokens
each request generated (greedy, ending at EOS: fewer than --new-tokens in one mode would make its
tokens/s lower for a reason other than speed). Sampling slows the
worker, so the throughput printed beside each profile is not a speed measurement; the shares are
what this is for (docs/BENCHMARKS.md, "VAR on vLLM").

py-spy is not a project dependency: install it anywhere (`pip install py-spy`) and pass --py-spy.

Run (vLLM environment):
    HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m benchmarks vllm_worker_profile --py-spy /path/to/py-spy \
        --output benchmarks/results/vllm_worker_profile.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from analysis_jobs.server_process import ManagedServer
from benchmarks.server_throughput import prompts, run_load, varmoe_sender
from benchmarks.vllm_throughput import vllm_env
from var_moe.loading import REFERENCE_MODEL_DIR
from var_moe.timing import rotated

HOOK = "_runner_prepare_inputs (var_moe/vllm/rows.py"


def hook_shares(raw: str) -> dict:
    """Shares of samples in py-spy's raw (collapsed) output: in the hook, and in the hook's own code
    (the hook frame is the leaf, or the frame below it is not vLLM's: var_moe's helpers)."""
    total = hook = own = 0
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        total += int(n)
        at = next((i for i, f in enumerate(frames) if HOOK in f), None)
        if at is None:
            continue
        hook += int(n)
        below = frames[at + 1] if at + 1 < len(frames) else ""
        if not below or "(vllm/" not in below:
            own += int(n)
    return {"samples": total, "hook_share": hook / max(total, 1), "hook_own_share": own / max(total, 1)}


def worker_pid(server_pid: int) -> int:
    """The server's vLLM worker: the child process named VLLM::Worker (multiprocessing executor)."""
    import psutil

    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            if "Worker" in proc.name() or any("Worker" in part for part in proc.cmdline()):
                return proc.pid
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError("no VLLM::Worker process under the server (is V1 multiprocessing off?)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--py-spy", default=shutil.which("py-spy"), help="path to the py-spy binary")
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=40, help="requests per client per profile")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="profiles per mode (modes alternate)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--core", type=int, default=0, help="the compute thread's core")
    p.add_argument("--log-dir", default="runs/vllm_worker_profile")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if not args.py_spy or not Path(args.py_spy).is_file():
        p.error("--py-spy: py-spy not found (pip install py-spy, then pass its path)")
    if min(args.clients, args.requests, args.new_tokens, args.rounds, args.rate) < 1:
        p.error("--clients, --requests, --new-tokens, --rounds and --rate must be >= 1")
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    texts = prompts(64)
    server = ManagedServer(args.model, args=["--engine", "vllm", "--dtype", "float32", "--max-model-len", "512",
                                             "--max-batch-size", "16", "--max-queue", "256"],
                           env=vllm_env(args.core, 2), log_path=log_dir / "server.log")
    rows = []
    try:
        server.wait_ready(900)
        pid = worker_pid(server.pid)
        senders = {mode: varmoe_sender(server.url, args.new_tokens, mode == "var") for mode in ("baseline", "var")}
        for mode, send in senders.items():  # warm-up: every shape once, outside the profiles
            run_load(send, args.clients, 2, texts)
        for rnd in range(args.rounds):
            for mode in rotated(list(senders), rnd):  # which mode goes first rotates (var_moe.timing)
                send = senders[mode]
                out = log_dir / f"{mode}_{rnd}.txt"
                spy = subprocess.Popen([args.py_spy, "record", "-r", str(args.rate), "-f", "raw", "-o", str(out),
                                        "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                load = run_load(send, args.clients, args.requests, texts)
                spy.send_signal(signal.SIGINT)  # py-spy writes its profile when interrupted
                spy.wait(timeout=60)
                # tokens per request: < --new-tokens would mean the mode ends requests early (EOS)
                row = {"round": rnd, "mode": mode, "tokens_per_s_while_sampled": load["tokens_per_s"],
                       "tokens_per_request": load["tokens"] / load["requests"],
                       **hook_shares(out.read_text())}
                rows.append(row)
                print(f"round {rnd} {mode:8s} samples {row['samples']:6d}  hook {row['hook_share'] * 100:5.2f}%  "
                      f"hook's own code {row['hook_own_share'] * 100:5.2f}%  "
                      f"{row['tokens_per_request']:.1f} tokens/request ({load['tokens_per_s']:.0f} tokens/s while sampled)",
                      flush=True)
    finally:
        server.stop()
    if args.output:
        Path(args.output).write_text(json.dumps({"clients": args.clients, "requests": args.requests,
                                               "new_tokens": args.new_tokens, "rate": args.rate, "profiles": rows},
                                              indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
