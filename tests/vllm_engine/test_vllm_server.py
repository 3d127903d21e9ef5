"""`varmoe serve --engine vllm` end to end on the reference model (subprocess on 127.0.0.1).

Endpoints (generate + stream, perplexity, completions, models, health), the toggle and its admin
token, per-request A/B pinning, /var/status and /metrics with the builtin server's names, that
the per-request tier counts add up to the device counters the metrics export, and that they equal
the builtin engine's on the same prompts (both servers load the committed tables themselves). Outputs are checked
against a plain in-process computation where one exists, never hard-coded.
Runs in the vLLM environment only (skipped elsewhere). Test: `pytest tests/vllm_engine/test_vllm_server.py`.
"""

from __future__ import annotations

import math

import httpx
import psutil
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (see make setup-vllm)")

from server_helpers import metric, stream_matches_non_stream  # noqa: E402  (tests/, on the path via conftest)

from analysis_jobs.server_process import ManagedServer  # noqa: E402
from var_moe.var.tables import VARTables  # noqa: E402

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "The history of the city of"


@pytest.fixture(scope="module")
def server(reference_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_server")
    # vLLM's own process layout (engine core and worker in processes of their own), as deployed
    env = {"VARMOE_ADMIN_TOKEN": TOKEN, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = ManagedServer(reference_model_dir, args=["--engine", "vllm", "--dtype", "float32", "--max-model-len", "512"],
                         env=env, log_path=tmp / "server.log")
    children = []
    try:  # not `with proc`: vLLM compiles at start-up, longer than the builtin server's ready timeout
        proc.wait_ready(timeout_s=900)
        children = psutil.Process(proc.pid).children(recursive=True)  # vLLM's engine-core and workers
        assert children, "expected vLLM's engine core in a process of its own"
        yield proc
    finally:
        proc.stop()
        _, alive = psutil.wait_procs(children, timeout=30)
        for child in alive:
            child.kill()
        # the server shuts vLLM's processes down with it (an orphaned engine core polls on forever)
        assert not alive, f"vLLM processes outlived the server: {[c.pid for c in alive]}"


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_health_and_status(client, reference_model_dir):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["var_available"] is True
    assert client.get("/v1/models").json()["data"][0]["id"]
    s = client.get("/var/status").json()
    assert s["mode"] == "var" and s["var"]["engine"] == "vllm"
    assert set(s["var"]["table_sizes"]) == {str(l) for l in s["var"]["layers"]}
    committed = VARTables.load(reference_model_dir / "var" / "var_tables.safetensors")  # token + pair entries
    assert s["var"]["pair_entries"] == sum(committed.pair_sizes().values()) > 0
    assert {int(l): n for l, n in s["var"]["pair_sizes"].items()} == committed.pair_sizes()


def test_pinning_greedy_and_routing(client):
    base = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 16, "var": False}).json()
    again = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 16, "var": False}).json()
    var = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 16, "var": True}).json()
    assert base["mode"] == "baseline" and var["mode"] == "var"
    assert base["text"] == again["text"]
    assert base["routing"]["fast"] == 0 and base["routing"]["learned"] > 0
    assert var["routing"]["fast"] > 0
    n_layers = len(client.get("/var/status").json()["var"]["layers"])
    for r in (base, var):  # every processed token was routed once per MoE layer
        assert sum(r["routing"].values()) == (r["prompt_tokens"] + r["generated_tokens"] - 1) * n_layers


def test_pinned_modes_share_a_batch_row_by_row(client):
    """Baseline and VAR requests in flight together: each gets exactly what it gets alone."""
    import concurrent.futures

    prompts = [PROMPT, "Once upon a time there was a", "In the beginning the river", "Water is"]
    alone = {(p, v): client.post("/v1/generate", json={"prompt": p, "max_new_tokens": 16, "var": v}).json()
             for p in prompts for v in (False, True)}
    assert any(alone[(p, False)]["text"] != alone[(p, True)]["text"] for p in prompts)  # the modes differ
    before = client.get("/metrics").text
    with concurrent.futures.ThreadPoolExecutor(len(alone)) as pool:
        futs = {key: pool.submit(client.post, "/v1/generate", json={"prompt": key[0], "max_new_tokens": 16,
                                                                    "var": key[1]}) for key in alone}
        together = {key: f.result().json() for key, f in futs.items()}
    after = client.get("/metrics").text
    for key, r in together.items():
        assert r["mode"] == ("var" if key[1] else "baseline")
        assert r["text"] == alone[key]["text"], key
        assert r["routing"] == alone[key]["routing"], key
    # the engine stepped with more than one request in flight (mean rows per step > 1)
    steps = metric(after, "varmoe_batch_size_count") - metric(before, "varmoe_batch_size_count")
    rows = metric(after, "varmoe_batch_size_sum") - metric(before, "varmoe_batch_size_sum")
    assert steps > 0 and rows / steps > 1.5


def test_stream_equals_non_stream(client):
    tokens = stream_matches_non_stream(client, PROMPT)
    assert all(math.isfinite(t["logprob"]) and t["logprob"] <= 0 for t in tokens)


def test_perplexity_and_completions(client):
    texts = ["The river runs through the old town.", "In the beginning there was a small village."]
    base = client.post("/v1/perplexity", json={"text": texts, "var": False}).json()
    var = client.post("/v1/perplexity", json={"text": texts, "var": True}).json()
    assert base["mode"] == "baseline" and var["mode"] == "var"
    assert [r["tokens"] for r in base["results"]] == [r["tokens"] for r in var["results"]]
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in base["results"] + var["results"])
    # completions echo + logprobs scores the same prompt as /v1/perplexity
    r = client.post("/v1/completions", json={"prompt": texts[0], "max_tokens": 0, "echo": True, "logprobs": 0,
                                             "var": False})
    assert r.status_code == 200, r.text
    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert lps[0] is None
    assert -sum(lps[1:]) / len(lps[1:]) == pytest.approx(base["results"][0]["mean_nll"], rel=1e-4)
    r = client.post("/v1/completions", json={"prompt": [PROMPT, "Water is"], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10


def test_toggle_needs_token_and_switches_mode(client):
    assert client.post("/var/toggle", json={"enabled": False}).status_code == 401
    assert client.post("/var/toggle", json={"enabled": False}, headers=AUTH).status_code == 200
    assert client.get("/var/status").json()["mode"] == "baseline"
    assert client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).json()["mode"] == "baseline"
    assert "varmoe_var_enabled 0.0" in client.get("/metrics").text
    assert client.post("/var/toggle", json={"enabled": True}, headers=AUTH).json()["enabled"] is True
    assert client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).json()["mode"] == "var"


def test_request_counts_add_up_to_device_counters(client):
    """Per-request fast counts (host, from token ids) == what the workers counted on the device."""
    before = client.get("/var/status").json()["decisions_since_start"]["var"]
    prompts = ["Once upon a time there was a", "The first thing to know about the market is", "Water is"]
    fast = 0
    for p in prompts:
        fast += client.post("/v1/generate", json={"prompt": p, "max_new_tokens": 12, "var": True}).json()["routing"]["fast"]
    after = client.get("/var/status").json()
    added = sum(after["decisions_since_start"]["var"][l]["fast"] - before[l]["fast"] for l in before)
    assert fast > 0 and added == fast
    checks = after["verification_checks_since_start"]
    assert sum(c["agree"] + c["disagree"] for c in checks.values()) > 0  # every table row is audited
    text = client.get("/metrics").text
    assert metric(text, "varmoe_routing_decisions_total", tier="fast") >= fast
    assert metric(text, "varmoe_generated_tokens_total", mode="var") > 0
    assert metric(text, "varmoe_generated_tokens_total", mode="baseline") > 0


def test_request_counts_equal_the_builtin_engines(client, reference_model_dir, tmp_path):
    """The same prompts through a builtin server on the same model and tables: per request, the same
    tier counts (the prompt's tokens, and the generated ones where both engines generated the same)."""
    prompts = [PROMPT, "Once upon a time there was a", "The first thing to know about the market is", "Water is"]
    with ManagedServer(reference_model_dir, log_path=tmp_path / "builtin.log") as builtin, \
            httpx.Client(base_url=builtin.url, timeout=120) as other:
        same_text = 0
        for p in prompts:
            for new in (1, 12):  # 1: only the prompt's tokens go through the model
                body = {"prompt": p, "max_new_tokens": new, "var": True}
                got, want = client.post("/v1/generate", json=body).json(), other.post("/v1/generate", json=body).json()
                assert got["prompt_tokens"] == want["prompt_tokens"]
                if new == 1 or got["text"] == want["text"]:
                    assert got["routing"] == want["routing"], (p, new)
                    same_text += new > 1
        assert same_text >= 2  # the generated tokens were compared too, not only the prompts'


def test_capture_is_refused_on_this_engine(client):
    r = client.post("/admin/capture/start", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["type"] == "capture_unavailable"


def test_expert_load_cannot_be_paused_on_this_engine(client):
    """The counting is compiled into vLLM's graph: pausing it is refused, and the counting goes on."""
    assert client.post("/admin/expert-load", json={"enabled": False}).status_code == 401
    r = client.post("/admin/expert-load", json={"enabled": False}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["type"] == "expert_load_fixed"
    assert "--no-expert-load-metrics" in r.json()["error"]["message"]
    assert "varmoe_expert_load_counting 1.0" in client.get("/metrics").text


def test_bad_input(client):
    r = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 100000})
    assert r.status_code == 422
    assert client.post("/v1/generate", json={"prompt": ""}).status_code == 422
