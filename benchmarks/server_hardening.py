"""The hardening probes (analysis_jobs/reliability_probes.py) side by side: this tree's server and a
server started from another source tree (e.g. the commit before the hardening), interleaved.

Both servers run at once on free 127.0.0.1 ports with the same model, one torch thread each and
`--max-queue 128 --request-timeout-s 900` (the old server knows no request budgets: it accepts 64 prompts as they are; the
new one gets `PROBE_SERVER_ARGS`). For every repeat, each probe runs on both servers back to back,
the order alternating between repeats, so the shared machine's drifting load hits both alike.
Prints one table (median of repeats) and writes every figure as JSON.

Run:  git archive <commit> server var_moe analysis_jobs | tar -x -C /tmp/before
      python benchmarks/server_hardening.py --before-tree /tmp/before --repeats 1 --out benchmarks/results/server_hardening.json
Results go to docs/BENCHMARKS.md (section "Hardening probes") with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from analysis_jobs import reliability_probes as rp
from analysis_jobs.server_process import ManagedServer, free_port


class TreeServer(ManagedServer):
    """`varmoe serve` run from the source tree `tree` (its own server/ and var_moe/ code); readiness
    and stopping as ManagedServer's."""

    def __init__(self, tree: Path, model: Path, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = ""
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.cmd = [sys.executable, "-m", "var_moe.cli", "serve", "--model", str(model), "--port", str(self.port),
                    "--threads", "1", "--log-level", "warning", *args]
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=tree, env=env, stdout=self._log, stderr=self._log)


FIGURES = {  # probe -> (label, key path, unit)
    "body_limit": [("21 MB body: time to answer", ("refusal_s",), "s"), ("21 MB body: answer", ("status",), ""),
                   ("21 MB body: server memory growth", ("rss_growth_mb",), "MB"),
                   ("21 MB body: /healthz max", ("healthz_max_s",), "s")],
    "fairness": [("4-token request beside 64 x 500: latency", ("small", "latency_s"), "s"),
                 ("64 x 500 request: latency", ("big", "latency_s"), "s"),
                 ("small one finished first", ("small_finished_first",), "")],
    "healthz_echo": [("/healthz max during 64 x 500 echo+logprobs", ("healthz_max_s",), "s"),
                     ("/healthz median during it", ("healthz_median_s",), "s"),
                     ("echo+logprobs request time", ("request_s",), "s")],
    "ppl_memory": [("perplexity 64 texts: memory growth", ("rss_growth_mb",), "MB")],
}


def get(d: dict, path: tuple) -> float | None:
    for k in path:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before-tree", required=True, help="source tree of the server to compare against")
    p.add_argument("--model", default=str(REPO / "models" / "reference-moe"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/server_hardening.json")
    args = p.parse_args(argv)
    from var_moe.loading import load_config

    vocab = int(load_config(args.model).vocab_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    servers = {"before": TreeServer(Path(args.before_tree).resolve(), Path(args.model), ["--max-queue", "128", "--request-timeout-s", "900"],
                                    out.with_suffix(".before.log")),
               "after": TreeServer(REPO, Path(args.model), rp.PROBE_SERVER_ARGS, out.with_suffix(".after.log"))}
    runs: dict = {name: {probe: [] for probe in FIGURES} for name in servers}
    try:
        for s in servers.values():
            s.wait_ready(300)
        for rep in range(args.repeats):
            order = ["before", "after"] if rep % 2 == 0 else ["after", "before"]
            for probe in FIGURES:
                for name in order:
                    fn = getattr(rp, f"probe_{probe}")
                    kw = {"vocab_size": vocab} if probe == "ppl_memory" else {}
                    try:
                        r = fn(servers[name], **kw)
                    except Exception as exc:  # a probe that breaks a server is a figure too
                        r = {"ok": False, "why": f"{type(exc).__name__}: {exc}"}
                    runs[name][probe].append(r)
                    print(f"[{rep}] {probe:13s} {name:6s} {'ok' if r.get('ok') else r.get('why', '')[:120]}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    print(f"\n| probe (median of {args.repeats}) | before | after |\n|---|---|---|")
    for probe, figs in FIGURES.items():
        for label, path, unit in figs:
            cells = []
            for name in ("before", "after"):
                vals = [get(r, path) for r in runs[name][probe]]
                vals = [v for v in vals if v is not None]
                if not vals:
                    cells.append("n/a")
                elif isinstance(vals[0], (bool, str)) or path == ("status",):
                    cells.append("/".join(map(str, vals)))
                else:
                    cells.append(f"{statistics.median(vals):.2f} {unit}".strip())
            print(f"| {label} | {cells[0]} | {cells[1]} |")
    out.write_text(json.dumps({"model": args.model, "repeats": args.repeats, "runs": runs}, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
