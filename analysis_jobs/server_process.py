"""`varmoe serve` as a subprocess on 127.0.0.1 and a free port, for analysis jobs and their tests.

`ManagedServer(model, admin_token=..., args=[...], python=...)` starts the server (in another
environment's interpreter when `python` is given, e.g. the vLLM one), `wait_ready()` polls
/readyz, `pid` is what psutil watches, `stop()` sends SIGTERM (the server drains in-flight work)
and returns the exit code, killing only if the drain overstays `timeout_s`. `threads=None` leaves torch's
threads to the server's default (no `--threads`, OMP_NUM_THREADS unset), as a user's `varmoe serve`.
Test: `pytest tests/test_server_lifecycle.py tests/test_reliability_checks.py`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    def __init__(self, model: str | Path | None = None, args: list[str] | None = None,
                 admin_token: str | None = None, threads: int | None = 1, log_path: str | Path | None = None,
                 env: dict[str, str | None] | None = None, python: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = admin_token if admin_token is not None else secrets.token_hex(16)
        cmd = [python or sys.executable, "-m", "var_moe.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               *(["--threads", str(threads)] if threads else []), "--log-level", "warning", *(["--model", str(model)] if model else []),
               *(args or [])]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads) if threads else None,
                    "VARMOE_ADMIN_TOKEN": self.admin_token, **(env or {})}
        full_env = {k: v for k, v in full_env.items() if v is not None}  # env value None: unset it
        self.log_path = Path(log_path) if log_path else None
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def wait_ready(self, timeout_s: float = 180.0) -> "ManagedServer":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"varmoe serve exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"varmoe serve not ready after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return "(no log; pass log_path)"

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL and not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ManagedServer":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
