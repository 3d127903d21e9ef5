"""Keep the server's own process off the cores vLLM's CPU build binds its compute threads to.

On vLLM's CPU build each worker binds its OpenMP compute threads to cores (VLLM_CPU_OMP_THREADS_BIND:
a list, or `auto`, which leaves cores for the other processes). The server's own threads (uvicorn's
event loop, the engine thread, vLLM's client threads) are not bound, so the kernel may run them on a
compute core and preempt a compute thread in the middle of a step (its cost: docs/BENCHMARKS.md).
After the engine has started, `front_off_compute_cores` moves this process's threads (and so those it
starts later) off the cores the engine's processes bound threads to; vLLM's own processes keep their
affinity. Linux only (per-thread affinity through /proc).
Test: `pytest tests/test_cpu_affinity.py`.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("varmoe.server")


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # the process ended, or no /proc
        return []


def compute_cores(root_pid: int) -> set[int]:
    """Cores that threads of `root_pid`'s descendant processes are bound to: threads whose affinity is
    narrower than the cores this process may use (vLLM's OpenMP compute threads)."""
    import psutil

    allowed = os.sched_getaffinity(0)
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return set()
    cores: set[int] = set()
    for child in children:
        for tid in _threads(child.pid):
            try:
                aff = os.sched_getaffinity(tid)
            except OSError:  # a thread that ended meanwhile
                continue
            if aff < allowed:
                cores |= aff
    return cores


def keep_off(cores: set[int]) -> set[int] | None:
    """Move every thread of this process to its allowed cores other than `cores`; returns the cores it
    now runs on, or None (nothing changed) where `cores` is empty or leaves no other core."""
    allowed = os.sched_getaffinity(0)
    rest = allowed - set(cores)
    if not cores or not rest:
        return None
    for tid in _threads(os.getpid()):
        try:
            os.sched_setaffinity(tid, rest)
        except OSError:
            pass
    return rest


def front_off_compute_cores() -> set[int] | None:
    """`keep_off(compute_cores(this process))`, logged."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = compute_cores(os.getpid())
    rest = keep_off(cores)
    if rest is not None:
        log.info("vLLM's compute threads are bound to cores %s; this server's own threads now run on %s",
                 sorted(cores), sorted(rest))
    return rest
