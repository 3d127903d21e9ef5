"""The real server (`varmoe serve` in a subprocess on 127.0.0.1, a free port) end to end: every
endpoint, streaming, the VAR toggle with and without a token, capture to Parquet, bad inputs.

Runs on the reference model when it is present, else on a tiny model with a trained tokenizer.
Outputs are checked against in-process references (`generate`, `sequence_nll`), never hard-coded.
Run: `pytest tests/test_server_api.py` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import httpx
import pytest
import torch
from server_helpers import shadowed_var_args, stream_matches_non_stream

from analysis_jobs.server_process import ManagedServer
from var_moe.loading import load_model
from var_moe.perplexity import sequence_nll

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "def forward(self, x):\n    return self"


@pytest.fixture(scope="module")
def model_dir(reference_model_dir):
    return reference_model_dir


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    proc = ManagedServer(model_dir, args=shadowed_var_args(model_dir, tmp) + ["--max-wait-ms", "20"],
                         env={"VARMOE_ADMIN_TOKEN": TOKEN}, log_path=tmp / "server.log")
    with proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def local(model_dir):
    torch.set_num_threads(1)
    return load_model(str(model_dir), dtype="float32")


# -- health --------------------------------------------------------------------------------------
def test_health_ready_models(client, model_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["var_available"] is True
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == model_dir.name == ready["model"]  # a name, not the server's file path
    assert card["max_model_len"] == 512  # the reference model's context


# -- generation ----------------------------------------------------------------------------------
def test_generate_greedy_matches_local_generate(client, local):
    model, tok = local
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=None)
    want = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    r = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 12, "var": False})
    body = r.json()
    assert r.status_code == 200, body
    assert body["mode"] == "baseline" and body["generated_tokens"] == 12 and body["text"] == want
    assert body["prompt_tokens"] == ids.shape[1]
    t = body["timings"]
    assert 0 <= t["queue_s"] <= t["ttft_s"] <= t["total_s"]
    layers = len(client.get("/var/status").json()["var"]["layers"])
    forwarded = body["prompt_tokens"] + body["generated_tokens"] - 1  # the last token is never fed back
    assert body["routing"] == {"fast": 0, "learned": forwarded * layers}


def test_generate_var_pinned(client):
    r = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "var": True}).json()
    assert r["mode"] == "var"
    assert r["routing"]["fast"] > 0
    assert sum(r["routing"].values()) == (r["prompt_tokens"] + r["generated_tokens"] - 1) * len(
        client.get("/var/status").json()["var"]["layers"])


def test_stream_equals_non_stream(client):
    stream_matches_non_stream(client, PROMPT)


def test_seeded_sampling_is_reproducible(client):
    req = {"prompt": PROMPT, "max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    a = client.post("/v1/generate", json=req).json()
    b = client.post("/v1/generate", json=req).json()
    assert a["text"] == b["text"] and a["generated_tokens"] == 10


def test_stop_string(client):
    full = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 16, "var": False}).json()["text"]
    stop = full[3:6]
    assert stop.strip(), "generated text too short for a stop test"
    r = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 16, "var": False, "stop": [stop]}).json()
    assert r["finish_reason"] == "stop" and r["text"] == full[: full.find(stop)]


# -- scoring -------------------------------------------------------------------------------------
def test_perplexity_matches_reference(client, local):
    model, tok = local
    texts = ["import os\nimport sys\n", "class A:\n    def f(self):\n        return 1\n"]
    body = client.post("/v1/perplexity", json={"text": texts, "var": False}).json()
    total_nll, total_n = 0.0, 0
    for text, item in zip(texts, body["results"]):
        ids = tok(text, return_tensors="pt")["input_ids"]
        nll, n = sequence_nll(model, ids, torch.ones_like(ids))
        assert item["tokens"] == int(n[0])
        assert item["mean_nll"] == pytest.approx(float(nll[0]) / int(n[0]), rel=1e-4)
        total_nll, total_n = total_nll + float(nll[0]), total_n + int(n[0])
    assert body["overall"]["tokens"] == total_n
    assert body["overall"]["mean_nll"] == pytest.approx(total_nll / total_n, rel=1e-4)
    assert body["mode"] == "baseline"
    single = client.post("/v1/perplexity", json={"text": texts[0], "var": False}).json()
    assert single["results"][0] == pytest.approx(body["results"][0], rel=1e-5)


def test_completions_loglikelihood_like_lm_eval(client, local):
    """lm-evaluation-harness local-completions: token-id prompts, echo, logprobs=1, max_tokens=1."""
    model, tok = local
    ctx, cont = tok("def f(x):\n    ")["input_ids"], tok("return x")["input_ids"]
    ids = ctx + cont
    r = client.post("/v1/completions", json={"model": "m", "prompt": [ids], "max_tokens": 1, "temperature": 0,
                                             "logprobs": 1, "echo": True, "seed": 1234, "var": False})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    # the harness's parse: sum over the continuation, greedy when each token is the top-1
    got = sum(lp["token_logprobs"][len(ctx):-1])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    ref_each = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert got == pytest.approx(float(ref_each[len(ctx) - 1:].sum()), abs=1e-3)
    greedy_ref = bool((logp[len(ctx) - 1:-1].argmax(-1) == torch.tensor(cont)).all())
    greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(ctx):-1], lp["top_logprobs"][len(ctx):-1]))
    assert greedy == greedy_ref
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_completions_text_prompts(client):
    r = client.post("/v1/completions", json={"prompt": [PROMPT, "import"], "max_tokens": 5, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 10
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.json()["choices"][0]["text"].strip() == PROMPT.strip()
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stop": ""})
    assert r.json()["usage"]["completion_tokens"] == 3  # an empty stop string stops nothing


# -- VAR control ---------------------------------------------------------------------------------
def test_toggle_needs_token(client):
    assert client.post("/var/toggle", json={"enabled": False}).status_code == 401
    r = client.post("/var/toggle", json={"enabled": False}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert client.post("/var/toggle", json={"enabled": False}, headers=AUTH).status_code == 200
    assert client.get("/var/status").json()["mode"] == "baseline"
    assert client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).json()["mode"] == "baseline"
    assert client.post("/var/toggle", json={"enabled": True}, headers=AUTH).json()["enabled"] is True
    assert client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).json()["mode"] == "var"
    metrics = client.get("/metrics").text
    assert "varmoe_var_enabled 1.0" in metrics


def test_var_status_fields(client):
    client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 4, "var": True})
    s = client.get("/var/status").json()
    assert s["var"]["available"] and set(s["var"]["table_sizes"]) == {str(l) for l in s["var"]["layers"]}
    assert "shadow_rate" in s["var"]["config"] and s["var"]["config"]["shadow_min_checks"] == 20
    assert set(s["var"]["demoted"]) == set(s["var"]["table_sizes"]) and all(v >= 0 for v in s["var"]["demoted"].values())
    assert s["var"]["config"]["enable_var"] == (s["mode"] == "var")  # the config shown is the mode served
    var_shares = s["tier_shares_since_start"]["var"]
    for shares in var_shares.values():
        assert sum(shares.values()) == pytest.approx(1.0)
    assert any(v is not None for v in s["verification_agreement"].values())


def test_var_status_keeps_baseline_traffic_out_of_vars_shares(client):
    before = client.get("/var/status").json()["decisions_since_start"]
    client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 4, "var": False})
    after = client.get("/var/status").json()
    assert after["decisions_since_start"]["var"] == before["var"]  # a baseline request adds nothing to VAR's
    added = {l: sum(after["decisions_since_start"]["baseline"][l].values()) - sum(before["baseline"][l].values())
             for l in before["baseline"]}
    assert all(n > 0 for n in added.values())
    for counts in after["decisions_since_start"]["baseline"].values():
        assert counts["fast"] == 0
    toggled = client.post("/var/toggle", json={"enabled": False}, headers=AUTH)
    assert toggled.status_code == 200
    s = client.get("/var/status").json()
    assert s["mode"] == "baseline" and s["var"]["config"]["enable_var"] is False
    client.post("/var/toggle", json={"enabled": True}, headers=AUTH)


def test_capture_roundtrip(client):
    from var_moe.capture.schema import read_stats

    assert client.post("/admin/capture/start").status_code == 401
    assert client.post("/admin/capture/start", headers=AUTH).status_code == 200
    g = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 6, "var": False}).json()
    stop = client.post("/admin/capture/stop", headers=AUTH).json()
    r = client.get("/admin/capture/stats", headers=AUTH)
    assert r.status_code == 200
    df, meta = _read_via_tmp(r.content, read_stats)
    forwarded = g["prompt_tokens"] + g["generated_tokens"] - 1
    assert stop["tokens"] == forwarded
    per_layer = df.groupby("layer")["frequency"].sum()
    assert (per_layer == forwarded).all()
    assert meta["num_tokens"] == forwarded
    assert client.get("/admin/capture/stats?part=pairs", headers=AUTH).status_code == 200


def _read_via_tmp(content: bytes, reader):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "stats.parquet"
        p.write_bytes(content)
        return reader(p)


# -- bad inputs ----------------------------------------------------------------------------------
BAD = [
    ("/v1/generate", {"prompt": "x", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ("/v1/generate", {"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("/v1/generate", {"prompt": "x", "max_new_tokens": 100000}, 422, "max_new_tokens"),
    ("/v1/generate", {"prompt": "x", "temperature": -1}, 422, "temperature"),
    ("/v1/generate", {"prompt": "x", "top_p": 0}, 422, "top_p"),
    ("/v1/generate", {"prompt": "x", "seed": -3}, 422, "seed"),
    ("/v1/generate", {"prompt": "x", "stream": "yes"}, 422, "stream"),
    ("/v1/generate", {"prompt": "x", "var": 1}, 422, "var"),
    ("/v1/generate", {"prompt": ""}, 422, "prompt"),
    ("/v1/generate", {"prompt": 5}, 422, "prompt"),
    ("/v1/generate", {"max_new_tokens": 3}, 422, "prompt"),
    ("/v1/generate", {"prompt": "x", "max_new_token": 3}, 422, "max_new_token"),
    ("/v1/generate", {"prompt": "def " * 5000}, 413, "prompt"),
    ("/v1/generate", {"prompt": "x" * 2_000_000}, 413, "prompt"),
    ("/v1/generate", [1, 2], 400, "body"),
    ("/v1/perplexity", {"text": []}, 422, "text"),
    ("/v1/perplexity", {"text": "a"}, 422, "text"),
    ("/v1/perplexity", {"text": ["ok text here", 3]}, 422, "text"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 422, "n"),
    ("/v1/completions", {"prompt": "x", "stream": True}, 422, "stream"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 422, "logprobs"),
    ("/v1/completions", {"prompt": [[1, 2], [10 ** 9]]}, 422, "prompt[1]"),
    ("/v1/completions", {"prompt": []}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 1.5}, 422, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, 422, "stop"),
]


@pytest.mark.parametrize("path,body,status,field", BAD, ids=[f"{p}:{f}:{s}" for p, _, s, f in BAD])
def test_bad_input(client, path, body, status, field):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] is not None and err["field"].startswith(field), err
    assert err["message"]


def test_malformed_json_and_toggle_body(client):
    r = client.post("/v1/generate", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_json"
    r = client.post("/var/toggle", json={"enabled": "yes"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["field"] == "enabled"
    assert client.get("/admin/capture/stats?part=other", headers=AUTH).status_code == 422
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert client.get("/v1/generate").status_code == 405


def test_openai_python_client(server):
    openai = pytest.importorskip("openai", reason="the openai package is not installed")
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = c.completions.create(model="served", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = r.choices[0]
    assert choice.text.startswith(PROMPT.strip()[:8]) and r.usage.completion_tokens == 4
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.top_logprobs[-1]) <= 2
    with pytest.raises(openai.UnprocessableEntityError):
        c.completions.create(model="served", prompt=PROMPT, max_tokens=4, n=3)
