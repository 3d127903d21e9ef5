"""Locust load for benchmarks/server_throughput.py: closed-loop greedy `POST /v1/completions`.

Each user sends fixed prompts back to back (wait_time constant(0)) to the OpenAI-compatible
`/v1/completions` endpoint, which both `varmoe serve` and `transformers serve` implement, with
`max_tokens` = the benchmark's --new-tokens and temperature 0. User u sends prompt
`(7u + i) % len(prompts)` as its i-th request, so every contender gets the same sequence of prompts.
HTTP only: this file imports nothing of var_moe. Settings come from the environment (the benchmark
sets them):

- `VARMOE_BL_PROMPTS`    JSON file holding a list of prompt strings; required.
- `VARMOE_BL_LOG`        JSONL log, required: one row per request (`t_start`, `t_end` in
                         time.time() seconds, `status`, `tokens` = usage.completion_tokens, or `text`
                         when a response has no usage) plus
                         `event` rows for test start, spawning complete and test stopping, from which
                         the benchmark takes its measurement window.
- `VARMOE_BL_MAX_TOKENS` max_tokens per request (default 64).
- `VARMOE_BL_MODEL`      the `model` field (transformers serve needs the model path); omitted if unset.
- `VARMOE_BL_VAR`        `true`/`false` pins the var-moe server's VAR mode (`var` field); unset = omitted.
- `VARMOE_BL_MAX_REQUESTS` requests per user before it stops (bounds the loop; default 100000).

Only 127.0.0.1/localhost/::1 hosts are accepted. Run (what the benchmark does per cell):

    VARMOE_BL_PROMPTS=p.json VARMOE_BL_LOG=log.jsonl locust -f benchmarks/locust_completions.py \
        --headless -u 16 -r 16 --run-time 20s --stop-timeout 120 --host http://127.0.0.1:8000 --csv runs/x
"""

from __future__ import annotations

import itertools
import json
import os
import time
from urllib.parse import urlparse

from locust import constant, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.exception import StopUser

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
_user_counter = itertools.count()
_log_fh = None


def _log(**row) -> None:
    global _log_fh
    if _log_fh is None:
        path = os.environ.get("VARMOE_BL_LOG")
        if not path:
            raise RuntimeError("VARMOE_BL_LOG is not set")
        _log_fh = open(path, "a", encoding="utf-8", buffering=1)
    _log_fh.write(json.dumps(row) + "\n")


def _prompts() -> list[str]:
    path = os.environ.get("VARMOE_BL_PROMPTS")
    if not path:
        raise RuntimeError("VARMOE_BL_PROMPTS is not set (a JSON list of prompt strings)")
    with open(path, encoding="utf-8") as fh:
        texts = json.load(fh)
    if not texts:
        raise RuntimeError(f"{path}: no prompts")
    return texts


@events.test_start.add_listener
def _on_start(environment, **_kw):
    host = urlparse(environment.host or "").hostname
    if host not in LOCAL_HOSTS:
        raise RuntimeError(f"--host {environment.host!r} is not a loopback address")
    _prompts()
    _log(event="test_start", t=time.time())


@events.spawning_complete.add_listener
def _on_spawned(user_count, **_kw):
    _log(event="spawning_complete", t=time.time(), users=user_count)


@events.test_stopping.add_listener
def _on_stopping(**_kw):
    _log(event="test_stopping", t=time.time())


@events.test_stop.add_listener
def _on_stop(**_kw):
    global _log_fh
    if _log_fh is not None:
        _log_fh.close()
        _log_fh = None


class CompletionsUser(FastHttpUser):
    """One closed-loop client: greedy /v1/completions requests, back to back."""

    wait_time = constant(0)
    network_timeout = 600.0
    connection_timeout = 30.0

    def on_start(self):
        self.index = next(_user_counter)
        self.texts = _prompts()
        self.sent = 0
        self.max_requests = int(os.environ.get("VARMOE_BL_MAX_REQUESTS", "100000"))
        self.body = {"max_tokens": int(os.environ.get("VARMOE_BL_MAX_TOKENS", "64")), "temperature": 0.0}
        if os.environ.get("VARMOE_BL_MODEL"):
            self.body["model"] = os.environ["VARMOE_BL_MODEL"]
        var = os.environ.get("VARMOE_BL_VAR", "")
        if var:
            self.body["var"] = var.lower() == "true"

    @task
    def complete(self):
        if self.sent >= self.max_requests:
            raise StopUser()
        prompt = self.texts[(self.index * 7 + self.sent) % len(self.texts)]
        self.sent += 1
        t_start = time.time()
        with self.client.post("/v1/completions", json={**self.body, "prompt": prompt}, name="/v1/completions",
                              catch_response=True) as resp:
            t_end = time.time()
            row = {"user": self.index, "t_start": t_start, "t_end": t_end, "status": resp.status_code, "tokens": None}
            if resp.status_code == 200:
                try:
                    data = resp.json() or {}
                    usage = data.get("usage") or {}
                    if usage.get("completion_tokens") is not None:
                        row["tokens"] = int(usage["completion_tokens"])
                    else:  # no usage: the benchmark counts the text's tokens with the model's tokenizer
                        row["text"] = data["choices"][0]["text"]
                except (ValueError, TypeError, KeyError, IndexError):
                    resp.failure("200 without usage.completion_tokens or choices[0].text")
                    row["status"] = -1
            else:
                resp.failure(f"HTTP {resp.status_code}")
            _log(**row)
