"""Every `curl` line in README.md and docs/*.md runs, as written, against a live server and gets a 2xx.

The server is `varmoe serve` on the reference model (analysis_jobs.server_process.ManagedServer:
127.0.0.1, a free port, admin token `secret` as in the docs); each line's `127.0.0.1:8000` /
`localhost:8000` is pointed at that port and nothing else is changed. The same request without its
Content-Type header still gets 400: the server keeps refusing form-encoded bodies.
Run: `pytest tests/test_docs_curl.py` (about half a minute on 2 CPU cores).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis_jobs.server_process import ManagedServer

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOKEN = "secret"  # the token the docs start the server with (`VARMOE_ADMIN_TOKEN=secret varmoe serve`)
HOST = re.compile(r"(?:https?://)?(?:127\.0\.0\.1|localhost):8000")


def curl_lines() -> list[tuple[str, str]]:
    """(where, command) for each `curl ...` command inside a fenced code block of the docs."""
    found = []
    for path in DOC_FILES:
        in_block, pending = False, ""
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            line = pending + line
            if line.rstrip().endswith("\\"):  # a continued command
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            if line.lstrip().startswith("curl "):
                found.append((f"{path.relative_to(REPO)}:{n}", line.strip()))
    return found


def to_argv(command: str, port: int) -> list[str]:
    return shlex.split(HOST.sub(f"127.0.0.1:{port}", command), comments=True)


def run_curl(argv: list[str]) -> tuple[int, str]:
    res = subprocess.run([*argv, "-sS", "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=120)
    body, _, code = res.stdout.rpartition("\n")
    assert res.returncode == 0, f"curl failed ({res.returncode}): {res.stderr}"
    return int(code), body


CURLS = curl_lines()


def test_the_docs_have_curl_examples():
    where = {w.split(":")[0] for w, _ in CURLS}
    assert "README.md" in where and len(CURLS) >= 2, CURLS
    for w, cmd in CURLS:
        assert HOST.search(cmd), f"{w}: the example does not target 127.0.0.1:8000 / localhost:8000: {cmd}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ManagedServer(admin_token=TOKEN, log_path=log) as srv:
        yield srv


@pytest.mark.parametrize("where,command", CURLS, ids=[w for w, _ in CURLS])
def test_curl_example_answers_2xx(server, where, command):
    code, body = run_curl(to_argv(command, server.port))
    assert 200 <= code < 300, f"{where}: {command}\n-> HTTP {code}: {body[:500]}"


def test_a_form_encoded_body_is_still_refused(server):
    """What the README's examples used to do (`curl -d` without a JSON Content-Type)."""
    posts = [(w, c) for w, c in CURLS if " -d " in c and "/v1/generate" in c]
    assert posts
    argv = to_argv(posts[0][1], server.port)
    i = argv.index("Content-Type: application/json")
    argv = argv[: i - 1] + argv[i + 1 :]  # drop `-H 'Content-Type: application/json'`
    code, body = run_curl(argv)
    assert code == 400 and "Content-Type: application/json" in body, (code, body)
