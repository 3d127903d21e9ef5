"""Locust user classes for the var-moe server: the real request mix, A/B pinning and VAR toggling.

Runs on its own, the way Locust users start it (headless, or the web UI on :8089 without
`--headless`), with built-in prompts:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 4 -r 2 -t 30s

HTTP only: it imports nothing of var_moe, server, analysis_jobs, torch or transformers. Every
setting below is an optional override from the environment (`python -m loadtests.run` sets them
from its flags):

- `VARMOE_LT_PROMPTS`   JSONL prompt file (`python -m analysis_jobs.prompt_file` cuts one from a
                        corpus's test split); unset = the built-in prompts of `loadtests/prompts.py`.
- `VARMOE_LT_MODE`      `mix` (requests in the server's current mode), `ab` (each user pinned to one
                        VAR mode through the `var` field, alternately, so half the users run each
                        mode under the same load), `toggle` (mix, plus `ToggleUser` flipping
                        `/var/toggle` every `VARMOE_LT_TOGGLE_S` seconds with `VARMOE_ADMIN_TOKEN`).
- `VARMOE_LT_LOG`       optional per-request JSONL log (mode, status, latency, server timings,
                        token counts, routing tiers): what the A/B job and reliability checks read.
- `VARMOE_LT_MAX_NEW`   max_new_tokens of short/long generations, e.g. `16,48` (default).
- `VARMOE_LT_MAX_REQUESTS` requests per user before it stops (bounds every loop; default 100000).
- `VARMOE_LT_ALLOW_REMOTE=1` allows a host other than 127.0.0.1/localhost (refused by default).

Requests are named with their mode (`/v1/generate short [var]`), so Locust's CSV and HTML reports
give latency percentiles per mode; client-side time to first token of streams is reported as
request type `TTFT`. A 429 counts as a failure named "429 back-pressure" (intended, and told apart
from real failures in the log). Run: `python -m loadtests.run --help`.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from locust import HttpUser, between, constant, events, task
from locust.exception import StopUser

if str(Path(__file__).resolve().parent.parent) not in sys.path:
    # `locust -f loadtests/locustfile.py` puts this folder, not the repository, on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtests.prompts import prompts_from_env  # noqa: E402

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
_pin_counter = itertools.count()
_log_lock = threading.Lock()
_log_fh = None
_prompts_cache: dict[str, list[dict]] = {}


def _env_int_pair(name: str, default: tuple[int, int]) -> tuple[int, int]:
    raw = os.environ.get(name)
    if not raw:
        return default
    a, b = (int(x) for x in raw.split(","))
    return a, b


def load_prompts() -> list[dict]:
    """The prompts of VARMOE_LT_PROMPTS when set, else the built-in ones (read once per file)."""
    path = os.environ.get("VARMOE_LT_PROMPTS") or ""
    if path not in _prompts_cache:
        _prompts_cache[path] = prompts_from_env(path or None)
    return _prompts_cache[path]


def log_request(**row) -> None:
    """Append one request record to VARMOE_LT_LOG (if set); greenlets share one file handle."""
    global _log_fh
    path = os.environ.get("VARMOE_LT_LOG")
    if not path:
        return
    with _log_lock:
        if _log_fh is None:
            _log_fh = open(path, "a", encoding="utf-8", buffering=1)
        _log_fh.write(json.dumps(row) + "\n")


@events.test_start.add_listener
def _check_target(environment, **_kw):
    host = urlparse(environment.host or "").hostname
    if host not in LOCAL_HOSTS and os.environ.get("VARMOE_LT_ALLOW_REMOTE") != "1":
        raise RuntimeError(f"--host {environment.host!r} is not a loopback address; set VARMOE_LT_ALLOW_REMOTE=1 to allow it")
    load_prompts()  # fail before any user starts when a prompt file is given but missing or empty


@events.test_stop.add_listener
def _close_log(**_kw):
    global _log_fh
    with _log_lock:
        if _log_fh is not None:
            _log_fh.close()
            _log_fh = None


class VarMoeUser(HttpUser):
    """One client sending the real mix of requests; pinned to a VAR mode in `ab` mode."""

    wait_time = between(0.05, 0.25)

    def on_start(self):
        self.prompts = load_prompts()
        index = next(_pin_counter)
        self.rng = random.Random(index * 7919 + 1)
        mode = os.environ.get("VARMOE_LT_MODE", "mix")
        if mode not in ("mix", "ab", "toggle"):
            raise RuntimeError(f"VARMOE_LT_MODE must be mix, ab or toggle, got {mode!r}")
        # Pin per user (not per request): a faster mode then serves its clients more requests.
        self.pin = (index % 2 == 0) if mode == "ab" else None
        self.max_new = _env_int_pair("VARMOE_LT_MAX_NEW", (16, 48))
        self.max_requests = int(os.environ.get("VARMOE_LT_MAX_REQUESTS", "100000"))
        self.sent = 0

    # -- helpers -----------------------------------------------------------------------------
    @property
    def tag(self) -> str:
        return "" if self.pin is None else (" [var]" if self.pin else " [baseline]")

    def _prompt(self, kind: str) -> str:
        pool = [p for p in self.prompts if p["kind"] == kind] or self.prompts
        return pool[self.rng.randrange(len(pool))]["text"]

    def _count(self) -> None:
        self.sent += 1
        if self.sent > self.max_requests:
            raise StopUser()

    def _body(self, **body) -> dict:
        if self.pin is not None:
            body["var"] = self.pin
        return body

    def _finish(self, resp, endpoint: str, kind: str, started: float, ttft: float | None = None, data=None):
        latency = time.perf_counter() - started
        status = resp.status_code
        if status == 429:
            resp.failure("429 back-pressure")
        elif status >= 400 and data is None:
            resp.failure(f"HTTP {status}")
        data = data if isinstance(data, dict) else {}
        log_request(t=time.time(), endpoint=endpoint, kind=kind, pin=self.pin, status=status,
                    latency_s=latency, client_ttft_s=ttft, mode=data.get("mode"),
                    prompt_tokens=data.get("prompt_tokens"), generated_tokens=data.get("generated_tokens"),
                    timings=data.get("timings"), routing=data.get("routing"),
                    finish_reason=data.get("finish_reason"),
                    retry_after=resp.headers.get("Retry-After") if status == 429 else None)

    # -- tasks -------------------------------------------------------------------------------
    def _generate(self, kind: str, stream: bool) -> None:
        self._count()
        max_new = self.max_new[0] if kind == "short" else self.max_new[1]
        body = self._body(prompt=self._prompt(kind), max_new_tokens=max_new, temperature=0.0, stream=stream)
        name = f"/v1/generate {kind}{' stream' if stream else ''}{self.tag}"
        started = time.perf_counter()
        if not stream:
            with self.client.post("/v1/generate", json=body, name=name, catch_response=True) as resp:
                data = _json(resp) if resp.status_code == 200 else None
                if resp.status_code == 200 and data is None:
                    resp.failure("200 with a body that is not JSON")
                self._finish(resp, "generate", kind, started, data=data)
            return
        ttft, final, error = None, None, None
        with self.client.post("/v1/generate", json=body, name=name, stream=True, catch_response=True) as resp:
            if resp.status_code == 200:
                try:
                    for event in _sse_events(resp):
                        if ttft is None and event.get("type", "token") == "token":
                            ttft = time.perf_counter() - started
                        if event.get("type") in ("done", "final", "end") or "timings" in event:
                            final = event
                        elif event.get("type") == "error":  # the server ended the stream with a reason
                            error = (event.get("error") or {}).get("type", "error")
                except Exception as exc:  # a broken stream is a failure of this request, not of the user
                    resp.failure(f"stream broke: {type(exc).__name__}")
                if final is None:
                    resp.failure(f"stream ended with error event: {error}" if error else "stream ended without a final event")
            self._finish(resp, "generate_stream", kind, started, ttft, final if final is not None else None)
        if ttft is not None:
            events.request.fire(request_type="TTFT", name=f"generate {kind}{self.tag}", response_time=ttft * 1000,
                                response_length=0, exception=None, context={})

    @task(4)
    def generate_short(self):
        self._generate("short", stream=False)

    @task(2)
    def generate_short_stream(self):
        self._generate("short", stream=True)

    @task(1)
    def generate_long(self):
        self._generate("long", stream=False)

    @task(1)
    def generate_long_stream(self):
        self._generate("long", stream=True)

    @task(1)
    def perplexity(self):
        self._count()
        body = self._body(text=self._prompt("long"))
        started = time.perf_counter()
        with self.client.post("/v1/perplexity", json=body, name=f"/v1/perplexity{self.tag}", catch_response=True) as resp:
            self._finish(resp, "perplexity", "long", started, data=_json(resp) if resp.status_code == 200 else None)

    @task(1)
    def completions(self):
        self._count()
        body = self._body(prompt=self._prompt("short"), max_tokens=self.max_new[0], temperature=0.0)
        started = time.perf_counter()
        with self.client.post("/v1/completions", json=body, name=f"/v1/completions{self.tag}", catch_response=True) as resp:
            data = _json(resp) if resp.status_code == 200 else None
            if data is not None:  # OpenAI shape: usage.completion_tokens
                usage = data.get("usage") or {}
                data = {"generated_tokens": usage.get("completion_tokens"), "prompt_tokens": usage.get("prompt_tokens"),
                        "mode": data.get("mode")}
            self._finish(resp, "completions", "short", started, data=data)


class ToggleUser(HttpUser):
    """Flips VAR on and off every VARMOE_LT_TOGGLE_S seconds (admin token from VARMOE_ADMIN_TOKEN).

    Only in `VARMOE_LT_MODE=toggle`: otherwise Locust does not pick it up (abstract), so a plain
    `locust -f loadtests/locustfile.py` sends no admin requests.
    """

    abstract = os.environ.get("VARMOE_LT_MODE", "mix") != "toggle"
    fixed_count = 1
    wait_time = constant(float(os.environ.get("VARMOE_LT_TOGGLE_S", "5")))

    def on_start(self):
        self.enabled = False
        self.flips = 0
        self.max_flips = int(os.environ.get("VARMOE_LT_MAX_REQUESTS", "100000"))

    @task
    def flip(self):
        if self.flips >= self.max_flips:
            raise StopUser()
        self.flips += 1
        self.enabled = not self.enabled
        headers = {"Authorization": f"Bearer {os.environ.get('VARMOE_ADMIN_TOKEN', '')}"}
        started = time.perf_counter()
        with self.client.post("/var/toggle", json={"enabled": self.enabled}, headers=headers,
                              name="/var/toggle", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
            log_request(t=time.time(), endpoint="toggle", kind="admin", pin=None, status=resp.status_code,
                        latency_s=time.perf_counter() - started, enabled=self.enabled)


def _json(resp):
    try:
        data = resp.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _sse_events(resp):
    """JSON payloads of a server-sent event stream (`data: {...}` lines; `[DONE]` ends it)."""
    for raw in resp.iter_lines():
        if not raw:
            continue
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if isinstance(event, dict):
            yield event
