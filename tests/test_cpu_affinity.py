"""server/cpu_affinity.py on real processes: a child with a thread bound to one core (what vLLM's CPU
worker does with its OpenMP threads) is found, and a process moves all its threads, later ones
included, off that core. Needs 2 CPUs and Linux."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux and at least 2 usable CPUs")

BOUND_CHILD = textwrap.dedent("""
    import os, sys, threading, time
    core = int(sys.argv[1])
    def work():
        os.sched_setaffinity(0, {core})  # this thread only, as OpenMP binds its threads
        time.sleep(60)
    threading.Thread(target=work, daemon=True).start()
    time.sleep(0.5)
    print("bound", flush=True)
    time.sleep(60)
""")

FRONT = textwrap.dedent("""
    import json, os, subprocess, sys, threading, time
    from server.cpu_affinity import front_off_compute_cores
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "bound"
    early = threading.Thread(target=time.sleep, args=(5,), daemon=True)
    early.start()
    rest = front_off_compute_cores()
    seen = {}
    late = threading.Thread(target=lambda: seen.update(late=os.sched_getaffinity(0)))
    late.start(); late.join()
    tids = [int(t) for t in os.listdir(f"/proc/{os.getpid()}/task")]
    print(json.dumps({"rest": sorted(rest), "threads": sorted(set().union(*(os.sched_getaffinity(t) for t in tids))),
                      "late": sorted(seen["late"]), "child_main": sorted(os.sched_getaffinity(child.pid))}))
    child.kill()
""")


def test_threads_leave_the_core_a_child_bound_its_compute_thread_to():
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[0]
    out = subprocess.run([sys.executable, "-c", FRONT, BOUND_CHILD, str(core)], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    want = [c for c in allowed if c != core]
    assert got["rest"] == want
    assert got["threads"] == want  # every thread of the process, the one started before the move too
    assert got["late"] == want  # a thread started afterwards inherits it
    assert got["child_main"] == allowed  # the child's own affinity is left as it was


def test_compute_cores_are_the_cores_of_bound_threads_only():
    from server.cpu_affinity import compute_cores

    core = sorted(os.sched_getaffinity(0))[-1]
    child = subprocess.Popen([sys.executable, "-c", BOUND_CHILD, str(core)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "bound"
        assert compute_cores(os.getpid()) == {core}  # the child's unbound main thread adds nothing
    finally:
        child.kill()
        child.wait()


def test_nothing_changes_without_a_bound_thread_or_a_spare_core():
    from server.cpu_affinity import keep_off

    before = os.sched_getaffinity(0)
    assert keep_off(set()) is None
    assert keep_off(set(before)) is None  # no core left for the front end
    assert os.sched_getaffinity(0) == before
