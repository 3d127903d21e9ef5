"""Hardening of the real server (`varmoe serve` subprocess): request bodies refused by size before
parsing (Content-Length and while streaming), half-sent bodies closed, schema limits on prompts,
token ids and stop strings, per-request prompt and work budgets, and one shutdown grace period.

Runs on the reference model.
Run: `pytest tests/test_server_limits.py` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pydantic
import pytest

from analysis_jobs.server_process import ManagedServer
from server.schemas import (
    MAX_STOPS,
    MAX_TOKEN_IDS,
    CompletionRequest,
    GenerateRequest,
    PerplexityRequest,
)

LIMIT = 100_000  # bytes of request body in the test server


@pytest.fixture(scope="module")
def model_dir(reference_model_dir):
    return reference_model_dir


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    args = ["--max-body-bytes", str(LIMIT), "--body-timeout-s", "1", "--max-request-tokens", "600",
            "--max-request-prompts", "4"]
    with ManagedServer(model_dir, args=args, log_path=tmp / "server.log") as proc:
        yield proc


def raw_request(url: str, head: str, body: bytes = b"", wait_s: float = 10.0) -> tuple[bytes, float]:
    """Send `head` + `body` on a raw socket; return what the server sent back and when it closed."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(head.encode() + body)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except TimeoutError:
            pass
    return data, time.monotonic() - t0


def test_body_over_the_limit_is_refused_from_its_content_length(server):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {21_000_000}\r\n\r\n")
    data, took = raw_request(server.url, head, b'{"prompt": [1, 2')  # the 21 MB never follow
    status_line, _, rest = data.partition(b"\r\n")
    assert b" 413 " in status_line, data[:300]
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "body_too_large"
    assert took < 5


def test_body_over_the_limit_is_refused_while_it_streams(server):
    def chunks():
        yield b'{"prompt": ['
        for _ in range(200):  # 200 x 1,000 ids, without a Content-Length
            yield b"1, " * 1000
        yield b"1]}"

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "body_too_large"


def test_half_sent_body_is_closed(server):
    head = ("POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n")
    data, took = raw_request(server.url, head, b'{"prompt": "abc', wait_s=20)
    assert b" 408 " in data.partition(b"\r\n")[0], data[:300]
    assert took < 10  # closed by the server (1 s body timeout), not by this client's 20 s
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_schema_limits_on_ids_strings_and_stops():
    with pytest.raises(pydantic.ValidationError, match="token ids"):
        CompletionRequest(prompt=[1] * (MAX_TOKEN_IDS + 1))
    with pytest.raises(pydantic.ValidationError, match="prompts per request"):
        CompletionRequest(prompt=[[1, 2]] * 65)
    with pytest.raises(pydantic.ValidationError, match="characters"):
        PerplexityRequest(text="x" * 300_000)
    with pytest.raises(pydantic.ValidationError, match="stop strings"):
        CompletionRequest(prompt="a", stop=["x"] * (MAX_STOPS + 1))
    with pytest.raises(pydantic.ValidationError, match="stop string"):
        GenerateRequest(prompt="a", stop=["y" * 300])
    assert CompletionRequest(prompt=[[1, 2], [3]], stop="\n").prompt == [[1, 2], [3]]


def test_schema_limit_answers_422_naming_the_field(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "stop": ["x"] * (MAX_STOPS + 1)}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["field"] == "stop"
    assert "at most" in r.json()["error"]["message"]


def test_request_budgets(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [[5, 6]] * 5, "max_tokens": 1}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
    assert "4" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [[5, 6]] * 2, "max_tokens": 300}, timeout=30)
    assert r.status_code == 413 and "600" in r.json()["error"]["message"], r.text  # 2 x 302 tokens
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [[5, 6]] * 2, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text


def test_shutdown_grace_is_one_total_and_below_one_second_still_a_limit(model_dir, tmp_path):
    """A long request is in flight at SIGTERM; with a 0.5 s grace the process exits within seconds
    (it used to be "no limit" for uvicorn, then the grace again for the engine)."""
    proc = ManagedServer(model_dir, args=["--shutdown-grace-s", "0.5", "--max-request-tokens", "100000",
                                          "--max-request-prompts", "16"], log_path=tmp_path / "s.log").wait_ready()
    body = {"prompt": [[5, 6, 7 + i] for i in range(16)], "max_tokens": 400, "temperature": 0.0}
    th = threading.Thread(target=lambda: httpx.post(proc.url + "/v1/completions", json=body, timeout=120), daemon=True)
    th.start()
    time.sleep(1.5)  # the request is running
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    try:
        proc.proc.wait(30)
    finally:
        proc.stop()
    assert time.monotonic() - t0 < 5.0, proc.log_tail()
