"""Route-level hardening, in process (FastAPI TestClient, the reference model, the real engine thread):
CPU work of a request off the event loop, the admin's VAR switch is final for pinned requests,
a served model name instead of the model's path (with the context as `max_model_len`), a capture
restart that really restarts, and no capture temp folder left when writing fails.

Run: `pytest tests/test_server_routes_hardening.py` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import asyncio
import tempfile

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings

TOKEN = "routes-hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(reference_model_dir):
    torch.set_num_threads(1)
    settings = ServerSettings(model=str(reference_model_dir), admin_token=TOKEN, threads=1, max_wait_ms=1)
    with TestClient(create_app(settings)) as c:
        yield c


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def test_tokenizing_and_response_building_run_off_the_event_loop(client, monkeypatch):
    import server.routes.openai as oc
    from server.state import ServerState

    seen = []
    tokenize, body = ServerState.tokenize, oc.completion_body
    monkeypatch.setattr(ServerState, "tokenize", lambda self, *a: seen.append(("tokenize", on_event_loop())) or
                        tokenize(self, *a))
    monkeypatch.setattr(oc, "completion_body", lambda *a: seen.append(("body", on_event_loop())) or body(*a))
    r = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 2, "echo": True, "logprobs": 2,
                                             "temperature": 0.0})
    assert r.status_code == 200, r.text
    r = client.post("/v1/perplexity", json={"text": ["def f(x):\n    return x", "import os"]})
    assert r.status_code == 200, r.text
    assert {name for name, _ in seen} == {"tokenize", "body"}
    assert not any(loop for _, loop in seen), f"CPU work ran on the event loop: {seen}"


def test_pinned_var_is_refused_once_the_admin_turned_var_off(client):
    assert client.post("/var/toggle", json={"enabled": False}, headers=AUTH).status_code == 200
    try:
        assert client.get("/var/status").json()["mode"] == "baseline"
        r = client.post("/v1/generate", json={"prompt": "import os", "max_new_tokens": 2, "var": True})
        assert r.status_code == 409 and r.json()["error"]["type"] == "var_disabled", r.text
        assert r.json()["error"]["field"] == "var" and "admin" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 1, "var": True})
        assert r.status_code == 409, r.text
        r = client.post("/v1/perplexity", json={"text": "import os\nimport sys", "var": True})
        assert r.status_code == 409, r.text
        bad = {"Authorization": "Bearer wrong"}
        r = client.post("/v1/generate", json={"prompt": "import os", "max_new_tokens": 2, "var": True}, headers=bad)
        assert r.status_code in (401, 403), r.text
        # the admin may still pin VAR (A/B checks); anyone may pin baseline
        r = client.post("/v1/generate", json={"prompt": "import os", "max_new_tokens": 2, "var": True}, headers=AUTH)
        assert r.status_code == 200 and r.json()["mode"] == "var", r.text
        r = client.post("/v1/generate", json={"prompt": "import os", "max_new_tokens": 2, "var": False})
        assert r.status_code == 200 and r.json()["mode"] == "baseline"
    finally:
        client.post("/var/toggle", json={"enabled": True}, headers=AUTH)
    r = client.post("/v1/generate", json={"prompt": "import os", "max_new_tokens": 2, "var": True})
    assert r.status_code == 200 and r.json()["mode"] == "var"


def test_api_reports_a_served_name_and_the_context_length(client, reference_model_dir):
    card = client.get("/v1/models").json()["data"][0]
    ready = client.get("/readyz").json()
    done = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 1}).json()
    for name in (card["id"], ready["model"], done["model"]):
        assert name == "reference-moe" and str(reference_model_dir) not in name
    assert card["max_model_len"] == 512


def test_a_second_capture_start_restarts_from_zero(client):
    assert client.post("/admin/capture/start", headers=AUTH).status_code == 200
    assert client.post("/v1/generate", json={"prompt": "import os\n", "max_new_tokens": 4}).status_code == 200
    assert client.post("/admin/capture/start", headers=AUTH).status_code == 200  # restart
    stopped = client.post("/admin/capture/stop", headers=AUTH).json()
    assert stopped["tokens"] == 0, stopped  # nothing ran since the restart


def test_capture_temp_folder_is_removed_when_writing_fails(client, monkeypatch, tmp_path):
    state = client.app.state.varmoe
    assert client.post("/admin/capture/start", headers=AUTH).status_code == 200
    client.post("/admin/capture/stop", headers=AUTH)

    def fail(path, var_enabled):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(state.host, "capture_parquet", fail)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r = client.get("/admin/capture/stats", headers=AUTH)
    assert r.status_code == 500 and r.json()["error"]["type"] == "capture_failed", r.text
    assert "disk full" in r.json()["error"]["message"]
    assert list(tmp_path.iterdir()) == []
