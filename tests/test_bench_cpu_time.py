"""benchmarks/cpu_time.py: the compute thread is told apart from the rest of a server's CPU time.

A child process runs one thread that burns ~0.6 CPU s and another that burns ~0.15 s (CPU time,
not wall time: the loops count their own thread's clock, so a loaded machine only makes them
slower), and both stay alive until the second snapshot, as a server's threads do; the busiest thread is taken as the compute thread, everything else (the other thread,
the interpreter's start) is outside it, and the figures add up.
"""

from __future__ import annotations

import subprocess
import sys

from benchmarks.cpu_time import outside_compute, per_1000_tokens, snapshot

BURN = """
import sys, threading, time
end = threading.Event()
def burn(s, done):
    t0 = time.thread_time()
    while time.thread_time() - t0 < s:
        pass
    done.set()
    end.wait(60)  # stays alive, as a server's threads do: the kernel keeps per-thread clocks of live threads
sys.stdin.readline()
da, db = threading.Event(), threading.Event()
threading.Thread(target=burn, args=(0.6, da)).start(); threading.Thread(target=burn, args=(0.15, db)).start()
da.wait(60); db.wait(60)
print("done", flush=True)
sys.stdin.readline()
end.set()
"""


def test_outside_compute_separates_the_busiest_thread():
    child = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        before = snapshot(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        cpu = outside_compute(before, snapshot(child.pid))
    finally:
        child.stdin.write("end\n")
        child.stdin.flush()
        child.wait(30)
    assert 0.55 <= cpu["compute_thread_s"] <= 0.9
    assert 0.1 <= cpu["outside_s"] <= 0.6
    assert abs(cpu["total_s"] - cpu["compute_thread_s"] - cpu["outside_s"]) < 0.01
    assert set(cpu["outside_by_process_s"]) == {"server"}
    per = per_1000_tokens(cpu, 2000)
    assert abs(per["outside_s_per_1k"] - cpu["outside_s"] / 2) < 0.01
