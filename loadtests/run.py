"""One headless command for a Locust run against the var-moe server, with CSV and HTML reports.

    python -m loadtests.run --url http://127.0.0.1:8000 --users 8 --spawn-rate 4 --duration 60 \
        --mode ab --out-dir runs/loadtest

writes `<out-dir>/locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`,
`locust_exceptions.csv`, `locust.html` and the per-request log `requests.jsonl`. Prompts come from
`--prompts FILE` (JSONL; `python -m analysis_jobs.prompt_file` cuts one from a corpus's test
split), else the locustfile's built-in prompts. `--mode toggle` needs `VARMOE_ADMIN_TOKEN` in the
environment. Only loopback targets are allowed unless `--allow-remote`; the run is bounded by
`--duration` (Locust's `-t`) and `--max-requests` per user, and the Locust process is killed if it
overstays its time by a minute.

`launch_locust(...)` is the one place that starts Locust as a subprocess (headless, bounded,
killed when it overstays); `benchmarks/server_throughput.py` runs its own locustfile through it.
HTTP only, like the rest of loadtests/. Test: `pytest tests/test_loadtests_run.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .prompts import read_prompts

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MODES = ("mix", "ab", "toggle")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    users: int = 8  # concurrent simulated clients
    spawn_rate: float = 4.0  # users started per second
    duration_s: float = 60.0  # Locust run time
    mode: str = "mix"  # mix | ab | toggle (see locustfile.py)
    out_dir: str = "runs/loadtest"
    prompts: str | None = None  # JSONL prompt file; None = the locustfile's built-in prompts
    toggle_s: float = 5.0  # seconds between /var/toggle flips in toggle mode
    max_new: tuple[int, int] = (16, 48)  # max_new_tokens of short / long generations
    max_requests: int = 100_000  # per user: bounds every loop
    stop_timeout_s: float = 30.0  # in-flight requests may finish after the run time
    allow_remote: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("users", "max_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("spawn_rate", "duration_s", "toggle_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_s', '').replace('_', '-')} must be positive")
        if len(self.max_new) != 2 or min(self.max_new) < 1:
            raise ValueError("--max-new must be two positive integers, e.g. 16,48")
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"--url {self.url!r} is not an http(s) URL")
        if parsed.hostname not in LOCAL_HOSTS and not self.allow_remote:
            raise ValueError(f"--url {self.url!r}: only loopback targets are allowed without --allow-remote")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "LoadConfig":
        raw = json.loads(text)
        raw["max_new"] = tuple(raw.get("max_new", (16, 48)))
        return cls(**raw)


@dataclass(frozen=True)
class LoadRun:
    out_dir: Path
    returncode: int
    stats_csv: Path
    history_csv: Path
    html: Path
    requests_log: Path


def check_prompts(cfg: LoadConfig) -> Path | None:
    """The prompt file of `cfg`, read once here so a bad file fails before Locust starts; None = built-in."""
    if not cfg.prompts:
        return None
    path = Path(cfg.prompts)
    if not path.exists():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    read_prompts(path)  # raises ValueError naming the line
    return path


def locust_command(cfg: LoadConfig, prefix: Path) -> list[str]:
    classes = ["VarMoeUser"] + (["ToggleUser"] if cfg.mode == "toggle" else [])
    users = cfg.users + (1 if cfg.mode == "toggle" else 0)  # the toggler takes one slot (fixed_count)
    return headless_command(LOCUSTFILE, cfg.url, users, cfg.spawn_rate, cfg.duration_s, cfg.stop_timeout_s, prefix,
                            html=True, full_history=True, classes=classes)


def headless_command(locustfile: Path, url: str, users: int, spawn_rate: float, run_time_s: float,
                     stop_timeout_s: float, csv_prefix: Path, html: bool = False, full_history: bool = False,
                     classes: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`python -m locust ... --headless` for one bounded run writing CSVs under `csv_prefix`."""
    return [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", url,
            "-u", str(users), "-r", str(spawn_rate), "-t", f"{max(1, round(run_time_s))}s",
            "--stop-timeout", str(int(stop_timeout_s)), "--csv", str(csv_prefix),
            *(["--csv-full-history"] if full_history else []), *(["--html", f"{csv_prefix}.html"] if html else []),
            "--exit-code-on-error", "0", "--only-summary", "--loglevel", "WARNING", *classes]


def launch_locust(cmd: list[str], env: dict[str, str], limit_s: float, stdout=None, stderr=None,
                  cwd: str | Path | None = None) -> int:
    """Run one Locust command; kill it if it overstays `limit_s` (RuntimeError). Returns its exit code."""
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, cwd=cwd)
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"locust did not finish within {limit_s:.0f} s; killed") from None


def run_load(cfg: LoadConfig, quiet: bool = False) -> LoadRun:
    """Run Locust headless with `cfg`; returns where its reports are."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = check_prompts(cfg)
    if cfg.mode == "toggle" and not os.environ.get("VARMOE_ADMIN_TOKEN"):
        raise ValueError("--mode toggle needs VARMOE_ADMIN_TOKEN in the environment")
    log = out / "requests.jsonl"
    log.unlink(missing_ok=True)
    prefix = out / "locust"
    env = dict(os.environ, VARMOE_LT_PROMPTS=str(prompts or ""), VARMOE_LT_MODE=cfg.mode, VARMOE_LT_LOG=str(log),
               VARMOE_LT_TOGGLE_S=str(cfg.toggle_s), VARMOE_LT_MAX_NEW=f"{cfg.max_new[0]},{cfg.max_new[1]}",
               VARMOE_LT_MAX_REQUESTS=str(cfg.max_requests), VARMOE_LT_ALLOW_REMOTE="1" if cfg.allow_remote else "0")
    (out / "load_config.json").write_text(cfg.to_json())
    stream = subprocess.DEVNULL if quiet else None
    rc = launch_locust(locust_command(cfg, prefix), env, cfg.duration_s + cfg.stop_timeout_s + 60, stream, stream)
    return LoadRun(out, rc, Path(f"{prefix}_stats.csv"), Path(f"{prefix}_stats_history.csv"),
                   Path(f"{prefix}.html"), log)


def read_request_log(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summarize(rows: list[dict]) -> dict:
    """Counts a person reads first: requests, statuses, failures by kind (429 kept apart)."""
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    fivexx = sum(n for s, n in by_status.items() if s.isdigit() and int(s) >= 500)
    other_fail = sum(n for s, n in by_status.items() if s.isdigit() and 400 <= int(s) < 500 and s != "429")
    return {"requests": len(rows), "by_status": by_status, "status_5xx": fivexx,
            "status_429": by_status.get("429", 0), "other_4xx": other_fail,
            "connection_errors": by_status.get("0", 0)}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description="Headless Locust run against a var-moe server.")
    p.add_argument("--url", default=LoadConfig.url)
    p.add_argument("--users", type=int, default=LoadConfig.users)
    p.add_argument("--spawn-rate", type=float, default=LoadConfig.spawn_rate)
    p.add_argument("--duration", type=float, default=LoadConfig.duration_s, help="seconds")
    p.add_argument("--mode", default="mix", choices=MODES)
    p.add_argument("--out-dir", default=LoadConfig.out_dir)
    p.add_argument("--prompts", default=None,
                   help="JSONL prompt file (default: the built-in prompts; `python -m analysis_jobs.prompt_file` "
                        "cuts one from a corpus's test split)")
    p.add_argument("--toggle-every", type=float, default=LoadConfig.toggle_s, help="seconds between VAR flips (--mode toggle)")
    p.add_argument("--max-new", default="16,48", help="max_new_tokens of short,long generations")
    p.add_argument("--max-requests", type=int, default=LoadConfig.max_requests, help="per user")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    try:
        max_new = tuple(int(x) for x in args.max_new.split(","))
    except ValueError:
        raise ValueError(f"--max-new must be two integers like 16,48, got {args.max_new!r}") from None
    return LoadConfig(url=args.url, users=args.users, spawn_rate=args.spawn_rate, duration_s=args.duration,
                      mode=args.mode, out_dir=args.out_dir, prompts=args.prompts,
                      toggle_s=args.toggle_every, max_new=max_new, max_requests=args.max_requests,
                      allow_remote=args.allow_remote)


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        run = run_load(config_from_args(args))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    summary = summarize(read_request_log(run.requests_log))
    print(json.dumps({"reports": str(run.out_dir), "locust_exit": run.returncode, **summary}, indent=2))
    return 0 if summary["status_5xx"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
