"""What VAR's per-step work costs inside vLLM, without HTTP: plain vLLM vs the VAR model, in-process.

Two engines on the reference model, each in its own process (vLLM keeps global state per process)
with the engine in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), one compute thread each, compiled
as served (or `--eager`): `plain` (vLLM's own Mixtral) and `var` (the Var* architecture with the
committed balanced tables loaded). Each repeat times, in rotated order, `llm.generate` of
--prompts greedy prompts x --new-tokens tokens on: plain; the VAR engine with every request
baseline (the bookkeeping alone: row marking, gathers, selects, counters); the VAR engine with every
request VAR (fast rows served from the table). The engine not being timed is suspended (SIGSTOP),
so it cannot take CPU from the one that is. Reported: median time per contender and the median of
per-repeat ratios to plain (>1 = faster than plain), plus the fast share of VAR rows. Each time is
also taken as the timing thread's CPU time (`time.thread_time`): in-process with one compute thread
the whole engine step runs on that thread, so CPU time leaves out the time the thread was not
scheduled, the largest noise on a shared machine. The VAR engine is built with room for the tables
file's own (previous, token) entries, as the server builds it (`--pair-capacity` to choose).
`--old-src DIR` adds a third engine: the VAR engine of another checkout of this project (e.g. a
`git worktree` of an earlier commit), timed in both modes in the same rotation, so a change to the
VAR code is measured side by side against the code before it (`old_*` rows; ratios to plain, and
new / old).

Run (vLLM environment):
    .venv-vllm/bin/python benchmarks/vllm_bookkeeping.py --repeats 9 --json benchmarks/results/vllm_bookkeeping.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["The history of the city", "Once upon a time there was a", "In the beginning the river", "Water is",
           "The first thing to know about the market is that", "import os\nimport sys\n", "def main():\n    ",
           "The weather today"]


def worker(kind: str, model: str, tables: str, eager: bool, prompts: int, new_tokens: int,
           pair_capacity: int | None = None) -> None:
    """Child process: build one engine, then answer "time <mode>" lines with seconds (and counts)."""
    from vllm import LLM, SamplingParams

    common = {"dtype": "float32", "max_model_len": 512, "enforce_eager": eager, "seed": 0,
              "enable_prefix_caching": False, "max_num_seqs": max(16, prompts)}
    if kind == "var":
        from var_moe.vllm import engine_kwargs

        if pair_capacity is None:  # as the server builds it: room for the file's own pair entries
            from var_moe.var.tables import VARTables

            pair_capacity = sum(VARTables.load(tables).pair_sizes().values())
        llm = LLM(**engine_kwargs(model, pair_capacity=pair_capacity, **common))
        reply = llm.collective_rpc("varmoe_load_tables", args=(tables,))[0]
        if "error" in reply:
            raise SystemExit(f"tables refused: {reply['error']}")
    else:
        llm = LLM(model=model, **common)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(prompts)]

    def params(var: bool | None) -> SamplingParams:
        extra = None if var is None else {"varmoe_var": var}
        return SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, extra_args=extra)

    for mode in ("base", "var") if kind == "var" else ("plain",):  # warm-up: every shape once
        llm.generate(texts, params(None if mode == "plain" else mode == "var"), use_tqdm=False)
    print("ready", flush=True)
    for line in sys.stdin:
        mode = line.split()[1]
        if kind == "var":
            llm.collective_rpc("varmoe_reset_counts")
        t0, c0 = time.perf_counter(), time.thread_time()
        llm.generate(texts, params(None if mode == "plain" else mode == "var"), use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
        counts = {}
        if kind == "var":
            c = llm.collective_rpc("varmoe_counts")[0]
            counts = {"fast": sum(v[0] for v in c.values()), "learned": sum(v[1] for v in c.values())}
        print(json.dumps({"seconds": dt, "cpu_seconds": cpu, **counts}), flush=True)


class Engine:
    def __init__(self, kind: str, args: argparse.Namespace, src: Path = ROOT, name: str | None = None):
        name = name or kind
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": str(args.core), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        script = src / "benchmarks" / Path(__file__).name  # the checkout's own worker imports its own var_moe
        cmd = [sys.executable, str(script), "--worker", kind, "--model", args.model, "--tables", args.tables,
               "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens)] + (["--eager"] if args.eager else []) \
            + ([] if args.pair_capacity is None else ["--pair-capacity", str(args.pair_capacity)])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=src, stderr=open(Path(args.log_dir) / f"{name}.log", "w"))
        for line in self.proc.stdout:
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError(f"engine {name} exited before it was ready (see {args.log_dir}/{name}.log)")
        self.pause()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def time(self, mode: str) -> dict:
        self.proc.send_signal(signal.SIGCONT)
        time.sleep(0.3)
        try:
            self.proc.stdin.write(f"time {mode}\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())
        finally:
            self.pause()

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "reference-moe"))
    ap.add_argument("--tables", default=str(ROOT / "models" / "reference-moe" / "var" / "var_tables.safetensors"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no compilation)")
    ap.add_argument("--pair-capacity", type=int, default=None,
                    help="(previous, token) entries the VAR engine can hold (default: the tables file's, as the server)")
    ap.add_argument("--old-src", default=None,
                    help="another checkout of this project whose VAR engine is timed alongside (old_* rows)")
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--log-dir", default="runs/vllm_bookkeeping")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", choices=["plain", "var"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.tables, args.eager, args.prompts, args.new_tokens, args.pair_capacity)
        return 0
    if args.prompts < 1 or args.new_tokens < 1 or args.repeats < 1:
        ap.error("--prompts, --new-tokens and --repeats must be >= 1")
    if args.pair_capacity is not None and args.pair_capacity < 0:
        ap.error("--pair-capacity must be >= 0")
    if args.old_src and not (Path(args.old_src) / "benchmarks" / Path(__file__).name).is_file():
        ap.error(f"--old-src {args.old_src}: no benchmarks/{Path(__file__).name} there (a checkout of this project?)")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    engines = {"plain": Engine("plain", args)}
    try:
        engines["var"] = Engine("var", args)
        cells = [("plain", "plain", "plain"), ("var_engine_baseline", "var", "base"), ("var_engine_var", "var", "var")]
        if args.old_src:
            engines["old"] = Engine("var", args, src=Path(args.old_src).resolve(), name="old")
            cells += [("old_baseline", "old", "base"), ("old_var", "old", "var")]
        times: dict[str, list[float]] = {name: [] for name, _, _ in cells}
        cpu_times: dict[str, list[float]] = {name: [] for name, _, _ in cells}
        fast_share: list[float] = []
        for rep in range(args.repeats):
            order = cells[rep % len(cells):] + cells[: rep % len(cells)]
            for name, engine, mode in order:
                r = engines[engine].time(mode)
                times[name].append(r["seconds"])
                cpu_times[name].append(r["cpu_seconds"])
                if name == "var_engine_var":
                    fast_share.append(r["fast"] / max(1, r["fast"] + r["learned"]))
                if mode == "base":
                    assert r["fast"] == 0 and r["learned"] == 0, r  # baseline rows are not VAR traffic
    finally:
        for e in engines.values():
            e.close()
    summary = {}
    tokens = args.prompts * args.new_tokens
    print(f"{'compiled' if not args.eager else 'eager'}: {args.prompts} prompts x {args.new_tokens} tokens, "
          f"{args.repeats} interleaved repeats, 1 thread; fast share of VAR rows {statistics.median(fast_share):.3f}")
    print(f"{'contender':<22}{'median s':>10}{'tokens/s':>10}{'x plain':>10}{'ratio range':>16}"
          f"{'cpu s':>9}{'cpu x plain':>13}{'cpu ratio range':>17}")
    for name in times:
        ratios = [p / t for p, t in zip(times["plain"], times[name])]
        cpu_ratios = [p / t for p, t in zip(cpu_times["plain"], cpu_times[name])]
        med, cpu_med = statistics.median(times[name]), statistics.median(cpu_times[name])
        summary[name] = {"median_s": med, "tokens_per_s": tokens / med, "ratio_median": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios), "cpu_median_s": cpu_med,
                         "cpu_ratio_median": statistics.median(cpu_ratios), "cpu_ratio_min": min(cpu_ratios),
                         "cpu_ratio_max": max(cpu_ratios)}
        print(f"{name:<22}{med:>10.3f}{tokens / med:>10.0f}{statistics.median(ratios):>10.3f}"
              f"{min(ratios):>8.3f}-{max(ratios):.3f}{cpu_med:>9.3f}{statistics.median(cpu_ratios):>13.3f}"
              f"{min(cpu_ratios):>9.3f}-{max(cpu_ratios):.3f}")
    if args.old_src:  # the change itself: new / old, per repeat (the two ran in the same rotation)
        for mode in ("baseline", "var"):
            new, old = times[f"var_engine_{mode}"], times[f"old_{mode}"]
            r = [o / n for o, n in zip(old, new)]
            rc = [o / n for o, n in zip(cpu_times[f"old_{mode}"], cpu_times[f"var_engine_{mode}"])]
            summary[f"new_over_old_{mode}"] = {"ratio_median": statistics.median(r), "ratio_min": min(r),
                                               "ratio_max": max(r), "cpu_ratio_median": statistics.median(rc)}
            print(f"new / old, {mode} requests: {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f}), "
                  f"CPU {statistics.median(rc):.3f}  (>1: the new code is faster)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"eager": args.eager, "prompts": args.prompts,
                                               "new_tokens": args.new_tokens, "repeats": args.repeats, "tables": args.tables,
                                               "pair_capacity": args.pair_capacity, "old_src": args.old_src, "fast_share": fast_share, "times_s": times, "cpu_times_s": cpu_times,
                                               "summary": summary},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":  # vLLM may spawn processes that import this file
    raise SystemExit(main())
