"""Expert load and routed experts on the builtin engine, end to end (`varmoe serve` in a subprocess):
- `return_routed_experts` arrays equal the experts a teacher-forced capture of the same tokens
  chooses (in-process, hooks on the model's routers), in the [tokens][MoE layers][k] layout, for
  `/v1/generate`, `/v1/completions` and a stream (whose token events carry each step's rows);
- the arrays load as a `varmoe trace --routing-array` input, and replayed on the model
  (var_moe/routing_replay.py) they give the model's own logits for those tokens;
- the per-expert counters in /metrics grew by exactly the slots those arrays hold, the default
  expert-load series are a few per MoE layer (per VAR tier too), and the windowed gauges match the counts;
- a request whose arrays would exceed max_response_bytes gets 413;
- an admin pauses and resumes the counting at run time (`POST /admin/expert-load`): nothing is
  counted while paused, the gauges leave /metrics, and counting resumes where it stopped.
Run: `pytest tests/test_server_expert_load.py` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from server_helpers import captured, sse_events

from analysis_jobs.server_process import REPO_ROOT, ManagedServer
from var_moe.loading import load_model
from var_moe.offload.trace import Trace
from var_moe.routing_replay import forward_with_routing

PROMPT = "def forward(self, x):\n    return self"


@pytest.fixture(scope="module")
def server(reference_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("expert-load")
    with ManagedServer(reference_model_dir, args=["--expert-load-per-expert", "--max-response-bytes", "20000",
                                                  "--max-wait-ms", "5"],
                       log_path=tmp / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def local(reference_model_dir):
    torch.set_num_threads(1)
    return load_model(str(reference_model_dir), dtype="float32")


def series(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def per_expert(client) -> np.ndarray:
    s = series(client.get("/metrics").text, "varmoe_expert_tokens_total")
    layers = sorted({int(k.split('layer="')[1].split('"')[0]) for k in s})
    experts = 1 + max(int(k.split('expert="')[1].split('"')[0]) for k in s)
    out = np.zeros((len(layers), experts))
    for k, v in s.items():
        out[layers.index(int(k.split('layer="')[1].split('"')[0])), int(k.split('expert="')[1].split('"')[0])] = v
    return out


def test_generate_returns_the_captured_experts_and_counters_match(client, local):
    before = per_expert(client)
    body = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "var": False,
                                             "return_routed_experts": True}).json()
    after = per_expert(client)
    _, tok = local
    ids = tok(PROMPT)["input_ids"]
    gen = tok(body["text"], add_special_tokens=False)["input_ids"]
    prompt_rows, gen_rows = body["prompt_routed_experts"], body["routed_experts"]
    assert len(prompt_rows) == len(ids) and len(gen_rows) == body["generated_tokens"] - 1
    k = len(prompt_rows[0][0])
    assert all(len(r) == after.shape[0] and all(len(x) == k for x in r) for r in prompt_rows + gen_rows)
    fed = ids + gen[: len(gen_rows)]
    assert prompt_rows + gen_rows == captured(local, fed)
    # the response re-scores the request: replaying its experts gives the model's own logits
    model, _ = local
    with torch.no_grad():
        plain_logits = model(input_ids=torch.tensor([fed])).logits
    replayed = forward_with_routing(model, torch.tensor([fed]), prompt_rows + gen_rows)
    torch.testing.assert_close(replayed, plain_logits, rtol=0, atol=0)
    # the device counters grew by exactly the routed slots of this request (nothing else ran)
    arr = np.array(prompt_rows + gen_rows)
    want = np.stack([np.bincount(arr[:, l].reshape(-1), minlength=after.shape[1]) for l in range(after.shape[0])])
    np.testing.assert_array_equal(after - before, want)


def test_completions_and_stream_carry_the_same_rows(client):
    req = {"prompt": PROMPT, "max_new_tokens": 6, "var": False, "return_routed_experts": True}
    plain = client.post("/v1/generate", json=req).json()
    comp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "var": False,
                                                "return_routed_experts": True}).json()
    choice = comp["choices"][0]
    assert choice["prompt_routed_experts"] == plain["prompt_routed_experts"]
    assert choice["routed_experts"] == plain["routed_experts"]
    events = sse_events(client.post("/v1/generate", json={**req, "stream": True}).text)
    tokens = [e for e in events[:-1] if e["type"] == "token"]
    assert tokens[0]["prompt_routed_experts"] == plain["prompt_routed_experts"]
    streamed = [row for e in tokens for row in e.get("routed_experts", [])]
    assert streamed == plain["routed_experts"] == events[-2]["routed_experts"]
    # without the flag nothing of it appears
    assert "routed_experts" not in client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).json()
    assert "routed_experts" not in client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}
                                               ).json()["choices"][0]


def test_arrays_load_as_a_routing_array_trace(client, tmp_path, reference_model_dir):
    body = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 5, "var": False,
                                             "return_routed_experts": True}).json()
    arr = np.array(body["prompt_routed_experts"] + body["routed_experts"], dtype=np.int16)
    np.save(tmp_path / "routed.npy", arr)
    out = tmp_path / "trace.parquet"
    res = subprocess.run([sys.executable, "-m", "var_moe.cli", "trace", "--routing-array", str(tmp_path / "routed.npy"),
                          "--num-experts", "8", "--output", str(out)], capture_output=True, text=True, timeout=300,
                         cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr
    trace = Trace.read(out)
    np.testing.assert_array_equal(trace.experts_TLK, arr)


def test_expert_load_gauges_are_a_few_per_layer_and_match_the_window(client):
    for var in (False, True):
        client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 4, "var": var})
    text = client.get("/metrics").text
    layers = len(series(text, "varmoe_expert_load_imbalance"))
    assert layers == 4
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line.startswith("varmoe_expert_load") or line.startswith("varmoe_routing_entropy")}
    default = sum(len(series(text, n)) for n in names)
    # imbalance, hottest share, dead experts, entropy per layer, imbalance per layer and VAR tier
    # (fast, learned), the window's tokens and whether counting is on
    assert default == 4 * layers + 2 * layers + 2
    assert series(text, "varmoe_expert_load_counting") == {"varmoe_expert_load_counting": 1.0}
    tiers = series(text, "varmoe_expert_load_tier_imbalance")
    assert any('tier="fast"' in k and not np.isnan(v) for k, v in tiers.items())  # the VAR request's table rows
    for v in series(text, "varmoe_routing_entropy_nats").values():
        assert 0 < v <= np.log(8) + 1e-6
    imb = series(text, "varmoe_expert_load_imbalance")
    share = series(text, "varmoe_expert_load_hottest_share")
    for key, v in imb.items():  # imbalance = E x hottest share
        layer = key.split("{")[1]
        assert v == pytest.approx(8 * share["varmoe_expert_load_hottest_share{" + layer], rel=1e-9)
    assert "# HELP varmoe_expert_tokens_total Routed slots per MoE layer and expert since start (32 series" in text


def test_too_large_a_routing_response_is_refused(client):
    r = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 500, "return_routed_experts": True})
    assert r.status_code == 413 and r.json()["error"]["type"] == "response_too_large", r.text
    assert "max_response_bytes" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": [PROMPT] * 8, "max_tokens": 50, "return_routed_experts": True})
    assert r.status_code == 413
    # the same requests without the arrays are fine
    assert client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 40}).status_code == 200


def test_var_mode_rows_carry_their_tier(client):
    """In VAR mode each row says whether a table served it; the fast rows are exactly the request's
    fast routing decisions the server counts apart (its `routing` tier counts)."""
    body = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 12, "var": True,
                                             "return_routed_experts": True}).json()
    tiers = body["prompt_routed_tiers"] + body["routed_tiers"]
    assert len(body["prompt_routed_tiers"]) == len(body["prompt_routed_experts"])
    assert len(body["routed_tiers"]) == len(body["routed_experts"])
    assert all(len(r) == 4 and set(r) <= {"fast", "learned"} for r in tiers)
    fast = sum(r.count("fast") for r in tiers)
    assert fast == body["routing"]["fast"] > 0
    assert sum(r.count("learned") for r in tiers) == body["routing"]["learned"]
    plain = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 4, "var": False,
                                              "return_routed_experts": True}).json()
    assert "prompt_routed_tiers" not in plain and "routed_tiers" not in plain


def test_admin_pauses_and_resumes_expert_load(client, server):
    body = {"prompt": PROMPT, "max_new_tokens": 6}
    assert client.post("/admin/expert-load", json={"enabled": False}).status_code == 401
    r = client.post("/admin/expert-load", json={"enabled": "off"}, headers=server.admin_headers)
    assert r.status_code == 422
    client.post("/v1/generate", json=body)
    before = per_expert(client)
    r = client.post("/admin/expert-load", json={"enabled": False}, headers=server.admin_headers)
    assert r.status_code == 200 and r.json() == {"enabled": False, "previous": True, "applies": "from the next step"}
    paused = client.post("/v1/generate", json={**body, "return_routed_experts": True}).json()
    # recording routed experts still works while paused
    assert len(paused["routed_experts"]) == paused["generated_tokens"] - 1 > 0
    client.post("/v1/generate", json=body)
    text = client.get("/metrics").text
    assert series(text, "varmoe_expert_load_counting") == {"varmoe_expert_load_counting": 0.0}
    assert "varmoe_expert_load_imbalance" not in text and "varmoe_expert_tokens_total" not in text
    again = client.post("/admin/expert-load", json={"enabled": False}, headers=server.admin_headers).json()
    assert again["previous"] is False
    r = client.post("/admin/expert-load", json={"enabled": True}, headers=server.admin_headers)
    assert r.json()["previous"] is False
    # the first scrape after resuming: its window starts at the resume, so it holds no token yet
    first = series(client.get("/metrics").text, "varmoe_expert_load_window_tokens")
    assert first == {"varmoe_expert_load_window_tokens": 0.0}
    assert np.array_equal(per_expert(client), before)  # the paused requests counted nothing
    out = client.post("/v1/generate", json={**body, "return_routed_experts": True}).json()
    grown = per_expert(client) - before
    slots = np.zeros_like(grown)
    for rows in (out["prompt_routed_experts"], out["routed_experts"]):
        for row in rows:  # [MoE layers][k] per token
            for layer, experts in enumerate(row):
                np.add.at(slots[layer], experts, 1)
    np.testing.assert_array_equal(grown, slots)  # counting resumed with the next request, exactly
    # the resumed window starts at the resume: it holds that request's tokens, not the earlier traffic
    window = series(client.get("/metrics").text, "varmoe_expert_load_window_tokens")
    tokens = len(out["prompt_routed_experts"]) + len(out["routed_experts"])
    assert window == {"varmoe_expert_load_window_tokens": tokens}
    assert series(client.get("/metrics").text, "varmoe_expert_load_counting") == {"varmoe_expert_load_counting": 1.0}
