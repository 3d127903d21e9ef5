"""Reliability runner: every check of reliability_checks.py against real `varmoe serve` processes.

    python -m analysis_jobs.reliability --duration 120 --output runs/reliability/reliability.json

Servers (each on a free 127.0.0.1 port, one after the other):
- main (default settings): fuzz, disconnects, toggle, soak (`--duration` s), then SIGTERM under load;
- overload (`--max-queue 4 --max-batch-size 2 --no-var-on-start`): low / over / low load (baseline
  mode, so the recovery measure is about the queue, not about VAR's own speed variations);
- timeout (`--request-timeout-s 0.1`): a long generation gets 408, a stream ends cleanly;
- no server: bad VAR tables at start (malformed and mismatched files) must be refused;
- probes (`reliability_probes.py`, flags `PROBE_SERVER_ARGS`): a 21 MB body, a small request
  beside a 64 x 500 one, /healthz under a big echo + logprobs request, perplexity memory.
Prints the counts (requests sent, failures by kind, 5xx, memory growth) and writes them as JSON.
Exit 0 when every check passed, 1 otherwise. `--model` defaults to the reference model when it has
VAR files, else a tiny model built in the output folder. Test: `pytest tests/test_reliability_*.py`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from . import reliability_checks as rc
from . import reliability_probes as rp
from .server_process import ManagedServer

CHECKS = ("fuzz", "disconnects", "toggle", "soak", "sigterm", "overload", "timeout", "bad_tables",
          "body_limit", "fairness", "healthz_echo", "ppl_memory")
PROBES = ("body_limit", "fairness", "healthz_echo", "ppl_memory")  # one server with PROBE_SERVER_ARGS
TIMEOUT_LIMIT_S = 0.1


def run_checks(model: str | Path, out_dir: str | Path, duration_s: float = 120.0, checks=CHECKS,
               fuzz_examples: int = 10, fuzz_time_s: float = 60.0, server_args: list[str] | None = None,
               log=print) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(server_args or [])
    results: dict = {"model": str(model), "server_args": extra, "started_unix": time.time(), "checks": {}}

    def record(name, fn):
        t0 = time.monotonic()
        log(f"[{name}] ...")
        try:
            r = fn()
        except Exception as exc:  # a check that crashes is a failed check, reported with its reason
            r = {"ok": False, "why": f"{type(exc).__name__}: {exc}"}
        r["seconds"] = round(time.monotonic() - t0, 1)
        results["checks"][name] = r
        log(f"[{name}] {'ok' if r['ok'] else 'FAILED: ' + r.get('why', '')[:400]} ({r['seconds']} s)")

    main_checks = [c for c in ("fuzz", "disconnects", "toggle", "soak", "sigterm") if c in checks]
    if main_checks:
        server = ManagedServer(model, args=extra, log_path=out / "server_main.log").wait_ready()
        try:
            if "fuzz" in checks:
                record("fuzz", lambda: rc.check_fuzz(server, fuzz_examples, fuzz_time_s, out))
            if "disconnects" in checks:
                record("disconnects", lambda: rc.check_disconnects(server))
            if "toggle" in checks:
                record("toggle", lambda: rc.check_toggle(server, duration_s=min(20.0, duration_s)))
            if "soak" in checks:
                record("soak", lambda: rc.check_soak(server, duration_s=duration_s))
            if "sigterm" in checks:
                record("sigterm", lambda: rc.check_sigterm(server))
        finally:
            server.stop()
    if "overload" in checks:
        with ManagedServer(model, args=extra + ["--max-queue", "4", "--max-batch-size", "2", "--no-var-on-start"],
                           log_path=out / "server_overload.log") as server:
            record("overload", lambda: rc.check_overload(server))
    if "timeout" in checks:
        with ManagedServer(model, args=extra + ["--request-timeout-s", str(TIMEOUT_LIMIT_S)],
                           log_path=out / "server_timeout.log") as server:
            record("timeout", lambda: rc.check_timeout(server, TIMEOUT_LIMIT_S))
    if "bad_tables" in checks:
        record("bad_tables", lambda: rc.check_bad_tables(model, out / "bad_tables"))
    if any(c in checks for c in PROBES):
        from var_moe.loading import load_config

        vocab = int(load_config(str(model)).vocab_size)
        with ManagedServer(model, args=extra + rp.PROBE_SERVER_ARGS, log_path=out / "server_probes.log") as server:
            if "body_limit" in checks:
                record("body_limit", lambda: rp.probe_body_limit(server))
            if "fairness" in checks:
                record("fairness", lambda: rp.probe_fairness(server))
            if "healthz_echo" in checks:
                record("healthz_echo", lambda: rp.probe_healthz_echo(server))
            if "ppl_memory" in checks:
                record("ppl_memory", lambda: rp.probe_ppl_memory(server, vocab_size=vocab))
    results["all_ok"] = all(r["ok"] for r in results["checks"].values())
    results["totals"] = totals(results["checks"])
    return results


def totals(checks: dict) -> dict:
    """Requests sent and failures by kind over every load-driving check."""
    t = {"requests": 0, "status_5xx": 0, "status_429": 0, "connection_errors": 0, "client_timeouts": 0,
         "broken_streams": 0}

    def add(s: dict) -> None:
        for k in t:
            t[k] += int(s.get(k, 0))

    for name, r in checks.items():
        for key in ("requests", "follow_up"):
            if isinstance(r.get(key), dict):
                add(r[key])
        for p in (r.get("phases") or {}).values():
            add(p)
    sig = checks.get("sigterm", {}).get("sent_after_sigterm") or {}
    t["refused_after_sigterm"] = int(sig.get("connection_errors", 0))  # the server had closed: intended
    t["connection_errors"] -= t["refused_after_sigterm"]
    t["requests"] -= t["refused_after_sigterm"]
    t["server_side_5xx"] = sum(int(r.get("server_5xx", 0)) for r in checks.values())
    soak = checks.get("soak", {})
    t["soak_rss_growth"] = soak.get("rss_growth")
    t["soak_failures_excluding_429"] = soak.get("failures_excluding_429")
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis_jobs.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=120.0, help="soak seconds (other checks are fixed and short)")
    p.add_argument("--model", default=None, help="model folder (default: reference model with VAR files, else tiny)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--fuzz-examples", type=int, default=10, help="schemathesis examples per operation")
    p.add_argument("--fuzz-time", type=float, default=60.0, help="schemathesis time budget, seconds")
    p.add_argument("--server-args", default="", help='extra `varmoe serve` flags, e.g. "--routing-stats calib.parquet"')
    p.add_argument("--output", default="runs/reliability/reliability.json")
    args = p.parse_args(argv)
    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    unknown = set(checks) - set(CHECKS)
    if unknown:
        p.error(f"--checks: unknown {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    if args.duration <= 0 or args.fuzz_examples < 1 or args.fuzz_time <= 0:
        p.error("--duration, --fuzz-examples and --fuzz-time must be positive")
    out_path = Path(args.output)
    from .fixtures import servable_var_model

    model = args.model or servable_var_model(out_path.parent)
    results = run_checks(model, out_path.parent, args.duration, checks, args.fuzz_examples, args.fuzz_time,
                         shlex.split(args.server_args))
    out_path.write_text(json.dumps(results, indent=2, default=str))
    t = results["totals"]
    print(f"requests sent: {t['requests']}; 5xx (client-seen): {t['status_5xx']}; 5xx (server counter): "
          f"{t['server_side_5xx']}; 429 (intended): {t['status_429']}; connection errors: {t['connection_errors']}; "
          f"client timeouts: {t['client_timeouts']}; broken streams: {t['broken_streams']}; "
          f"refused after SIGTERM (intended): {t['refused_after_sigterm']}")
    growth = t["soak_rss_growth"]
    print(f"soak: failures apart from 429: {t['soak_failures_excluding_429']}; resident memory growth after warm-up: "
          f"{'n/a' if growth is None else f'{100 * growth:.2f}%'}")
    for line in rp.summary_lines(results["checks"]):
        print(line)
    for name, r in results["checks"].items():
        print(f"  {name:12s} {'ok' if r['ok'] else 'FAILED'}  {r.get('why', '')[:200]}")
    print(f"wrote {out_path}")
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
