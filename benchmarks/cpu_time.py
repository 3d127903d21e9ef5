"""CPU time a server spends outside its compute thread, from the kernel's per-process and per-thread clocks.

A server's work that is not the model's forward (HTTP, tokenization and detokenization, response
building, scheduling, VAR's host-side bookkeeping, busy polling) costs cores a deployment pays
for, and at high concurrency it competes with the compute thread. `snapshot(pid)` reads the
user + system CPU seconds of every process in the server's tree (dead threads included: process
clocks keep them) and of every live thread of each process; `outside_compute(before, after)`
returns, over the interval, the tree's total, the compute thread's share, the rest, and the rest
per process kind. The compute thread is the busiest thread of the process that runs the model:
vLLM's worker (`VLLM::Worker`) where there is one, else the busiest thread of the whole tree (the
builtin engine's engine thread). With one compute thread per server (the benchmarks' setting) that
thread does the forward passes and nothing else that scales with requests.

Used by benchmarks/vllm_throughput.py (per cell: CPU seconds outside the compute thread per 1,000
generated tokens). Test: `pytest tests/test_bench_cpu_time.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WORKER_NAMES = ("VLLM::Worker",)


@dataclass
class Snapshot:
    procs: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (kind, cpu s)
    threads: dict[tuple[int, int], float] = field(default_factory=dict)  # (pid, tid) -> cpu s


def _kind(proc, root_pid: int) -> str:
    name = proc.name()
    if proc.pid == root_pid:
        return "server"
    return name if name.startswith("VLLM::") else "child:" + name


def snapshot(pid: int) -> Snapshot:
    import psutil

    snap = Snapshot()
    root = psutil.Process(pid)
    for proc in [root] + root.children(recursive=True):
        try:
            t = proc.cpu_times()
            snap.procs[proc.pid] = (_kind(proc, pid), t.user + t.system)
            for th in proc.threads():
                snap.threads[(proc.pid, th.id)] = th.user_time + th.system_time
        except psutil.NoSuchProcess:
            continue
    return snap


def outside_compute(before: Snapshot, after: Snapshot) -> dict:
    """CPU seconds over the interval: total, the compute thread's, the rest, and the rest per kind."""
    proc_d = {pid: (kind, s - before.procs.get(pid, (kind, 0.0))[1]) for pid, (kind, s) in after.procs.items()}
    thread_d = {key: s - before.threads.get(key, 0.0) for key, s in after.threads.items()}
    workers = [pid for pid, (kind, _) in proc_d.items() if kind in WORKER_NAMES]
    pool = {k: v for k, v in thread_d.items() if not workers or k[0] in workers}
    compute_key = max(pool, key=pool.get) if pool else None
    compute = pool.get(compute_key, 0.0) if compute_key else 0.0
    by_kind: dict[str, float] = {}
    for pid, (kind, s) in proc_d.items():
        by_kind[kind] = by_kind.get(kind, 0.0) + s - (compute if compute_key and pid == compute_key[0] else 0.0)
    total = sum(s for _, s in proc_d.values())
    return {"total_s": round(total, 3), "compute_thread_s": round(compute, 3), "outside_s": round(total - compute, 3),
            "outside_by_process_s": {k: round(v, 3) for k, v in sorted(by_kind.items())}}


def per_1000_tokens(cpu: dict, tokens: int) -> dict:
    """The interval's figures scaled to 1,000 generated tokens."""
    scale = 1000.0 / max(tokens, 1)
    return {"outside_s_per_1k": round(cpu["outside_s"] * scale, 4),
            "compute_s_per_1k": round(cpu["compute_thread_s"] * scale, 4),
            "outside_by_process_s_per_1k": {k: round(v * scale, 4) for k, v in cpu["outside_by_process_s"].items()}}
