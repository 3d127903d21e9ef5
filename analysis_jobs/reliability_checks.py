"""Reliability checks of the var-moe server: fuzzing, overload, faults and soak, each bounded.

Every check takes a running server (`ManagedServer`, or a model folder for the start-up checks)
and returns a dict of counts with `ok` (True/False) and `why` when not ok. A 429 with Retry-After
is intended back-pressure, never a failure; any 5xx is. The server's own
`varmoe_requests_total{status}` counter is read before and after, so 5xx answers a client never saw
(e.g. to a request it abandoned) are counted too.

- `check_fuzz`        schemathesis on /openapi.json (not_a_server_error, bounded examples and time)
- `check_overload`    low load, overload, low load: 429s carry Retry-After; throughput recovers
- `check_disconnects` streaming clients leave after the first events; the queue drains, no 5xx
- `check_toggle`      /var/toggle every second under load; every answer 200
- `check_timeout`     a request longer than request_timeout_s gets 408 (stream: an error event)
- `check_bad_tables`  malformed / mismatched VAR tables at start: non-zero exit, a clear message
- `check_sigterm`     SIGTERM under load: in-flight requests finish or end cleanly; the process exits
- `check_soak`        steady load: zero failures apart from 429s; RSS growth < 5% after warm-up
Run them all: `python -m analysis_jobs.reliability`. Test: `pytest tests/test_reliability_*.py`.
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx

from .load_driver import CLIENT_TIMEOUT, CONN_ERROR, STREAM_BROKEN, drive, summarize
from .prom import diff, fetch, series
from .server_process import REPO_ROOT, ManagedServer, free_port

PROMPTS = ("def parse_args(argv):\n    parser = argparse.ArgumentParser(",
           "class Queue:\n    \"\"\"A FIFO queue.\"\"\"\n\n    def __init__(self, maxsize=0):",
           "import os\nimport sys\n\n\ndef main():\n    for name in os.listdir(",
           "    if not isinstance(value, int):\n        raise TypeError(")


def server_5xx(before, after) -> int:
    d = diff(after, before)
    return int(sum(v for (name, labels), v in d.items()
                   if name == "varmoe_requests_total" and dict(labels).get("status", "0")[:1] == "5"))


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def _gen(max_new: int = 16, stream: bool = False, **extra):
    def body(c: int, i: int) -> tuple[str, dict]:
        return "/v1/generate", {"prompt": PROMPTS[(c + i) % len(PROMPTS)], "max_new_tokens": max_new,
                                "temperature": 0.0, "stream": stream, **extra}
    return body


def _verdict(out: dict, problems: list[str]) -> dict:
    out["ok"] = not problems
    if problems:
        out["why"] = "; ".join(problems)
    return out


# -- fuzzing ------------------------------------------------------------------------------------
def check_fuzz(server: ManagedServer, max_examples: int = 10, max_time_s: float = 120.0,
               report_dir: str | Path = "runs/reliability") -> dict:
    report = Path(report_dir) / "schemathesis-junit.xml"
    report.parent.mkdir(parents=True, exist_ok=True)
    before = fetch(server.url)
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", str(max_examples), "--max-time", str(int(max_time_s)),
           "--request-timeout", "60", "--workers", "1", "--seed", "0", "--generation-database", "none",
           "--no-shrink", "-H", f"Authorization: Bearer {server.admin_token}", "--report", "junit", "--report-junit-path", str(report), "--no-color"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time_s + 120, cwd=REPO_ROOT)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = None, "schemathesis overran its time limit (a hang)"
    cases = failures = errors = 0
    if report.exists():
        root = ET.parse(report).getroot()
        for suite in root.iter("testsuite"):
            cases += int(suite.get("tests", 0))
            failures += int(suite.get("failures", 0))
            errors += int(suite.get("errors", 0))
    after = fetch(server.url) if _ready(server.url) else before
    out = {"operations_tested": cases, "failures": failures, "errors": errors, "schemathesis_exit": rc,
           "server_5xx": server_5xx(before, after), "wall_s": time.monotonic() - t0,
           "fuzz_requests": int(sum(v for (n, _), v in diff(after, before).items() if n == "varmoe_requests_total")),
           "ready_after": _ready(server.url)}
    problems = []
    if report.exists():
        out["failure_messages"] = [" ".join((f.text or f.get("message") or "").split())[:600] for f in ET.parse(report).getroot().iter("failure")]
    if rc != 0:
        problems.append(f"schemathesis exit {rc}: {'; '.join(out.get('failure_messages', [])) or tail[-1500:]}")
    if out["server_5xx"]:
        problems.append(f"{out['server_5xx']} 5xx answers")
    if not out["ready_after"]:
        problems.append("server not ready after fuzzing")
    return _verdict(out, problems)


# -- overload -----------------------------------------------------------------------------------
def check_overload(server: ManagedServer, clients: int = 24, phase_s: float = 6.0, low_clients: int = 2,
                   max_new: int = 16) -> dict:
    """Needs a server with a small queue (e.g. --max-queue 4 --max-batch-size 2)."""
    before = fetch(server.url)
    phases = {}

    def phase(name: str, n: int) -> dict:
        time.sleep(1.0)  # let the previous phase's last batch leave the engine
        t0 = time.monotonic()
        s = summarize(drive(server.url, n, phase_s, _gen(max_new), timeout_s=120))
        s["tokens_per_s"] = s["generated_tokens"] / (time.monotonic() - t0)
        phases[name] = s
        return s

    base = phase("low_before", low_clients)["tokens_per_s"]
    phase("overload", clients)
    # Recovery within three low-load phases: on a shared machine one phase can be slowed by others.
    for attempt in range(3):
        recovery = phase("low_after" if attempt == 0 else f"low_after_{attempt + 1}", low_clients)["tokens_per_s"] / max(base, 1e-9)
        if recovery >= 0.6:
            break
    out = {"phases": phases, "server_5xx": server_5xx(before, fetch(server.url)), "recovery_ratio": recovery}
    ov = phases["overload"]
    problems = []
    if ov["status_429"] == 0:
        problems.append(f"{clients} clients never filled the queue (no 429)")
    if ov["status_429_with_retry_after"] != ov["status_429"]:
        problems.append("a 429 came without Retry-After")
    for name, s in phases.items():
        bad = s["status_5xx"] + s["connection_errors"] + s["client_timeouts"] + s["broken_streams"]
        if bad:
            problems.append(f"{name}: {bad} failed requests {s['by_status']}")
    if out["server_5xx"]:
        problems.append(f"{out['server_5xx']} 5xx answers")
    if any(p["status_429"] for name, p in phases.items() if name.startswith("low_after")):
        problems.append("429s persisted after the load dropped")
    if recovery < 0.6:
        problems.append(f"throughput after the overload stayed at {recovery:.2f}x of before (three tries)")
    return _verdict(out, problems)


# -- faults -------------------------------------------------------------------------------------
def check_disconnects(server: ManagedServer, streams: int = 12, clients: int = 4, max_new: int = 200) -> dict:
    before = fetch(server.url)
    rows = drive(server.url, clients, 60.0, _gen(max_new, stream=True), max_requests=streams, disconnect_after=2)
    t0 = time.monotonic()
    drained = False
    while time.monotonic() - t0 < 30:  # cancelled rows must leave the queue and the batch
        if series(fetch(server.url), "varmoe_queue_depth") == 0:
            drained = True
            break
        time.sleep(0.2)
    follow = drive(server.url, 1, 30.0, _gen(8), max_requests=3)
    after = fetch(server.url)
    out = {"disconnected_streams": sum(1 for r in rows if r.error == "client disconnected on purpose"),
           "requests": summarize(rows), "queue_drained": drained, "follow_up": summarize(follow),
           "server_5xx": server_5xx(before, after), "ready_after": _ready(server.url)}
    problems = []
    if out["disconnected_streams"] == 0:
        problems.append("no stream reached its second event")
    if out["server_5xx"]:
        problems.append(f"{out['server_5xx']} 5xx answers")
    if not drained:
        problems.append("the queue did not drain after the disconnects")
    if out["follow_up"]["by_status"] != {"200": 3}:
        problems.append(f"requests after the disconnects: {out['follow_up']['by_status']}")
    return _verdict(out, problems)


def check_toggle(server: ManagedServer, duration_s: float = 10.0, clients: int = 4, every_s: float = 1.0) -> dict:
    before = fetch(server.url)
    toggles: list[int] = []
    stop = threading.Event()

    def toggler():
        with httpx.Client(base_url=server.url, headers=server.admin_headers, timeout=30) as c:
            for enabled in itertools.cycle((False, True)):
                if stop.wait(every_s):
                    return
                toggles.append(c.post("/var/toggle", json={"enabled": enabled}).status_code)

    th = threading.Thread(target=toggler, daemon=True)
    th.start()
    kinds = itertools.cycle(("gen", "stream", "ppl"))

    def body(c, i):
        k = next(kinds)
        if k == "ppl":
            return "/v1/perplexity", {"text": PROMPTS[i % len(PROMPTS)] * 3}
        return _gen(16, stream=(k == "stream"))(c, i)

    rows = drive(server.url, clients, duration_s, body)
    stop.set()
    th.join(every_s + 30)
    status = httpx.get(server.url + "/var/status", timeout=30).json()
    out = {"requests": summarize(rows), "modes": {m: sum(1 for r in rows if r.mode == m) for m in ("var", "baseline")},
           "toggles": len(toggles), "toggle_status": {str(s): toggles.count(s) for s in set(toggles)},
           "server_5xx": server_5xx(before, fetch(server.url)), "final_mode": status.get("mode")}
    httpx.post(server.url + "/var/toggle", json={"enabled": True}, headers=server.admin_headers, timeout=30)
    problems = []
    if set(out["requests"]["by_status"]) - {"200"}:
        problems.append(f"answers under toggling: {out['requests']['by_status']}")
    if set(toggles) - {200} or not toggles:
        problems.append(f"toggle answers: {out['toggle_status']}")
    if out["server_5xx"]:
        problems.append(f"{out['server_5xx']} 5xx answers")
    return _verdict(out, problems)


def check_timeout(server: ManagedServer, limit_s: float, max_new: int = 500) -> dict:
    """Needs a server started with a short --request-timeout-s (`limit_s`)."""
    before = fetch(server.url)
    prompt = PROMPTS[0]
    for max_new in (max_new, max_new - 20, max_new - 100, max_new // 2, max_new // 4):
        # the longest generation the model's context allows (413/422 when prompt + new is too long)
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/generate", json={"prompt": prompt, "max_new_tokens": max_new}, timeout=limit_s + 60)
        if r.status_code not in (413, 422):
            break
    is_json = r.headers.get("content-type", "").startswith("application/json")
    plain = {"status": r.status_code, "latency_s": time.monotonic() - t0, "max_new_tokens": max_new,
             "error_type": (r.json().get("error") or {}).get("type") if is_json else None}
    rows = drive(server.url, 1, limit_s + 60, _gen(max_new, stream=True), max_requests=1)
    follow = drive(server.url, 1, 30.0, _gen(1), max_requests=2)
    out = {"limit_s": limit_s, "plain": plain, "stream": rows[0].to_dict(), "follow_up": summarize(follow),
           "server_5xx": server_5xx(before, fetch(server.url)), "ready_after": _ready(server.url)}
    problems = []
    if plain["status"] != 408 or plain["error_type"] != "timeout":
        problems.append(f"a request over the limit answered {plain['status']} ({plain['error_type']}), not 408 timeout")
    if plain["latency_s"] > limit_s + 10:
        problems.append(f"the timeout answer took {plain['latency_s']:.1f} s for a {limit_s} s limit")
    if not rows[0].stream_clean:
        problems.append(f"the timed-out stream did not end cleanly: {rows[0].to_dict()}")
    if out["server_5xx"] or not out["ready_after"]:
        problems.append("5xx answers or not ready after the timeout")
    return _verdict(out, problems)


def _serve_expect_refusal(model_dir: Path, tables: Path, timeout_s: float = 180.0) -> dict:
    cmd = [sys.executable, "-m", "var_moe.cli", "serve", "--model", str(model_dir), "--var-tables", str(tables),
           "--port", str(free_port()), "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VARMOE_ADMIN_TOKEN": "x"}
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, "did not exit: the server started (or hung) with bad tables"
    return {"exit_code": rc, "seconds": time.monotonic() - t0, "message": err.strip().splitlines()[-1] if err.strip() else "",
            "traceback": "Traceback" in err}


def check_bad_tables(model_dir: str | Path, work_dir: str | Path) -> dict:
    """`varmoe serve --var-tables F` with a garbage file and with tables of another model."""
    from var_moe.adapters import get_adapter
    from var_moe.tiny import tiny_model
    from var_moe.var import VARTables

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    garbage = work / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file " * 8)
    other = tiny_model("mixtral", 1, vocab_size=77, num_local_experts=4)  # another vocabulary and E
    mismatched = VARTables.empty(other, get_adapter(other)).save(work / "other_model_tables.safetensors")
    out = {"malformed": _serve_expect_refusal(Path(model_dir), garbage),
           "mismatched": _serve_expect_refusal(Path(model_dir), mismatched)}
    problems = []
    for name, r in out.items():
        if r["exit_code"] in (0, None):
            problems.append(f"{name} tables: exit code {r['exit_code']}")
        if r["traceback"]:
            problems.append(f"{name} tables: a stack trace instead of a message")
        if "tables" not in r["message"].lower() and "var" not in r["message"].lower():
            problems.append(f"{name} tables: the message does not name the tables: {r['message']!r}")
    return _verdict(out, problems)


def check_sigterm(server: ManagedServer, clients: int = 6, after_s: float = 3.0, max_new: int = 48,
                  exit_within_s: float = 90.0) -> dict:
    """Runs load, sends SIGTERM mid-way, and classifies every request. Stops the server."""
    result: dict = {}
    body = lambda c, i: _gen(max_new, stream=(c % 2 == 1))(c, i)  # noqa: E731
    th = threading.Thread(target=lambda: result.setdefault("rows", drive(server.url, clients, after_s + 8, body,
                                                                         timeout_s=exit_within_s)), daemon=True)
    th.start()
    time.sleep(after_s)
    t_term = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(exit_within_s)
    except subprocess.TimeoutExpired:
        rc = None
    exit_s = time.monotonic() - t_term
    th.join(exit_within_s + 60)
    rows = result.get("rows", [])
    in_flight = [r for r in rows if r.t - r.latency_s < t_term < r.t]
    after = [r for r in rows if r.t - r.latency_s >= t_term]
    clean_refusals = (503, CONN_ERROR)
    out = {"requests": summarize(rows), "in_flight_at_sigterm": summarize(in_flight),
           "sent_after_sigterm": summarize(after), "exit_code": rc, "exit_s": exit_s, "client_thread_done": not th.is_alive()}
    problems = []
    bad_in_flight = [r for r in in_flight if not (r.status == 200 and r.stream_clean is not False) and r.status not in (503,)]
    if bad_in_flight:
        problems.append(f"{len(bad_in_flight)} in-flight requests broke: {[r.to_dict() for r in bad_in_flight[:3]]}")
    if any(r.status not in clean_refusals + (200,) for r in after):
        problems.append(f"requests after SIGTERM: {out['sent_after_sigterm']['by_status']}")
    if any(r.status >= 500 and r.status != 503 for r in rows) or any(r.status in (CLIENT_TIMEOUT, STREAM_BROKEN) for r in rows):
        problems.append(f"5xx, hangs or broken streams: {out['requests']['by_status']}")
    if rc is None:
        server.proc.kill()
        problems.append(f"the server did not exit within {exit_within_s} s of SIGTERM")
    if not out["client_thread_done"]:
        problems.append("a client hung")
    server.stop()
    return _verdict(out, problems)


# -- soak ---------------------------------------------------------------------------------------
def check_soak(server: ManagedServer, duration_s: float = 120.0, clients: int = 4, warmup_frac: float = 0.3,
               max_growth: float = 0.05, sample_s: float = 1.0) -> dict:
    import psutil

    proc = psutil.Process(server.pid)
    rss: list[tuple[float, int]] = []
    stop = threading.Event()

    def sampler():
        t0 = time.monotonic()
        while not stop.is_set():
            rss.append((time.monotonic() - t0, proc.memory_info().rss))
            stop.wait(sample_s)

    before = fetch(server.url)
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    kinds = itertools.cycle(("gen", "gen", "stream", "ppl"))

    def body(c, i):
        k = next(kinds)
        if k == "ppl":
            return "/v1/perplexity", {"text": PROMPTS[i % len(PROMPTS)] * 3}
        return _gen(16, stream=(k == "stream"))(c, i)

    rows = drive(server.url, clients, duration_s, body)
    stop.set()
    th.join(sample_s + 5)
    s = summarize(rows)
    warm_t = warmup_frac * duration_s
    window = max(2, len(rss) // 10)
    warm = [m for t, m in rss if t >= warm_t][:window]
    end = [m for _, m in rss][-window:]
    rss_warm, rss_end = statistics.median(warm or [0]), statistics.median(end or [0])
    growth = (rss_end - rss_warm) / rss_warm if rss_warm else None
    failures = s["requests"] - s["by_status"].get("200", 0) - s["status_429"]
    out = {"duration_s": duration_s, "clients": clients, "requests": s, "failures_excluding_429": failures,
           "server_5xx": server_5xx(before, fetch(server.url)), "rss_after_warmup_mb": rss_warm / 2**20,
           "rss_end_mb": rss_end / 2**20, "rss_growth": growth, "rss_samples": len(rss),
           "requests_per_s": s["requests"] / duration_s}
    problems = []
    if failures:
        problems.append(f"{failures} failed requests: {s['by_status']}")
    if out["server_5xx"]:
        problems.append(f"{out['server_5xx']} 5xx answers")
    if growth is None or growth >= max_growth:
        problems.append(f"resident memory grew {growth if growth is None else f'{100 * growth:.1f}%'} after warm-up")
    return _verdict(out, problems)
