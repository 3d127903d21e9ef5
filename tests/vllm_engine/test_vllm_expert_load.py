"""Expert load and routed experts on `varmoe serve --engine vllm` (reference model, compiled, as
served), end to end:
- `return_routed_experts` arrays equal the experts a teacher-forced capture of the same tokens
  chooses on the builtin model (hooks on the Hugging Face model's routers), compared as top-k sets
  per row, for `/v1/generate`, `/v1/completions` and a stream (its token events carry the rows);
- the per-expert counters in /metrics (counted in vLLM's compiled graph) grew by exactly the slots
  those arrays hold; the default expert-load series are a few per MoE layer, with the per-tier
  imbalance of VAR-mode rows.
Runs in the vLLM environment only. Test: `pytest tests/vllm_engine/test_vllm_expert_load.py`.
"""

from __future__ import annotations

import numpy as np
import psutil
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (see make setup-vllm)")

import httpx  # noqa: E402
import torch  # noqa: E402
from server_helpers import captured, sse_events  # noqa: E402

from analysis_jobs.server_process import ManagedServer  # noqa: E402
from var_moe.loading import load_model  # noqa: E402

PROMPT = "The history of the city of"


@pytest.fixture(scope="module")
def server(reference_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_expert_load")
    proc = ManagedServer(reference_model_dir, args=["--engine", "vllm", "--dtype", "float32", "--max-model-len", "512",
                                                    "--expert-load-per-expert"],
                         env={"VLLM_CPU_KVCACHE_SPACE": "1"}, log_path=tmp / "server.log")
    children = []
    try:
        proc.wait_ready(timeout_s=900)
        children = psutil.Process(proc.pid).children(recursive=True)
        yield proc
    finally:
        proc.stop()
        _, alive = psutil.wait_procs(children, timeout=30)
        for child in alive:
            child.kill()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def local(reference_model_dir):
    torch.set_num_threads(1)
    return load_model(str(reference_model_dir), dtype="float32")


def as_sets(rows: list) -> list:
    return [[sorted(x) for x in r] for r in rows]


def per_expert(client) -> np.ndarray:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("varmoe_expert_tokens_total{"):
            head, value = line.rsplit(" ", 1)
            layer = int(head.split('layer="')[1].split('"')[0])
            expert = int(head.split('expert="')[1].split('"')[0])
            out[(layer, expert)] = float(value)
    layers = sorted({l for l, _ in out})
    arr = np.zeros((len(layers), 1 + max(e for _, e in out)))
    for (l, e), v in out.items():
        arr[layers.index(l), e] = v
    return arr


def test_routed_experts_equal_the_capture_and_the_counters(client, local):
    before = per_expert(client)
    body = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "var": False,
                                             "return_routed_experts": True}).json()
    after = per_expert(client)
    _, tok = local
    ids = tok(PROMPT)["input_ids"]
    gen = tok(body["text"], add_special_tokens=False)["input_ids"]
    prompt_rows, gen_rows = body["prompt_routed_experts"], body["routed_experts"]
    assert len(prompt_rows) == len(ids) and len(gen_rows) == body["generated_tokens"] - 1
    assert as_sets(prompt_rows + gen_rows) == as_sets(captured(local, ids + gen[: len(gen_rows)]))
    arr = np.array(prompt_rows + gen_rows)
    want = np.stack([np.bincount(arr[:, l].reshape(-1), minlength=after.shape[1]) for l in range(after.shape[0])])
    np.testing.assert_array_equal(after - before, want)


def test_completions_stream_and_metrics(client):
    req = {"prompt": PROMPT, "max_new_tokens": 6, "var": False, "return_routed_experts": True}
    plain = client.post("/v1/generate", json=req).json()
    comp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "var": False,
                                                "return_routed_experts": True}).json()["choices"][0]
    assert comp["prompt_routed_experts"] == plain["prompt_routed_experts"]
    assert comp["routed_experts"] == plain["routed_experts"]
    events = sse_events(client.post("/v1/generate", json={**req, "stream": True}).text)
    tokens = [e for e in events[:-1] if e["type"] == "token"]
    assert tokens[0]["prompt_routed_experts"] == plain["prompt_routed_experts"]
    assert [row for e in tokens for row in e.get("routed_experts", [])] == plain["routed_experts"]
    assert "routed_experts" not in client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).json()
    client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "var": True})
    text = client.get("/metrics").text
    imb = [l for l in text.splitlines() if l.startswith("varmoe_expert_load_imbalance{")]
    assert len(imb) == 4 and all(1.0 <= float(l.rsplit(" ", 1)[1]) <= 8.0 for l in imb)
    tiers = [l for l in text.splitlines() if l.startswith("varmoe_expert_load_tier_imbalance{")]
    assert len(tiers) == 8  # layers x (fast, learned)
    assert any('tier="fast"' in l and l.rsplit(" ", 1)[1] != "NaN" for l in tiers)  # VAR rows were counted
    for l in text.splitlines():
        if l.startswith("varmoe_routing_entropy_nats{"):
            assert 0 < float(l.rsplit(" ", 1)[1]) <= np.log(8) + 1e-6


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
