"""The headless Locust runner against a stub server speaking the var-moe API (no model needed).

The stub records every request, so the test checks what Locust actually sent: the A/B pin split
per user, streams read to the end, toggles with the admin token, and the reports written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from analysis_jobs.server_process import free_port
from loadtests.prompts import BUILTIN_PROMPTS
from loadtests.run import LOCUSTFILE, LoadConfig, locust_command, read_request_log, run_load, summarize


def stub_app(seen: list, token: str) -> FastAPI:
    app = FastAPI()
    state = {"var": True}

    def body(var):
        mode = "var" if (state["var"] if var is None else var) else "baseline"
        return {"text": "x", "prompt_tokens": 3, "generated_tokens": 4, "finish_reason": "length", "mode": mode,
                "timings": {"queue_s": 0.001, "ttft_s": 0.002, "total_s": 0.01},
                "routing": {"fast": 5, "learned": 2}}

    @app.post("/v1/generate")
    async def generate(req: Request):
        data = await req.json()
        seen.append(("generate", data))
        if data.get("stream"):
            def events():
                yield 'data: {"type": "token", "token_id": 1, "text": "x", "logprob": -1.0}\n\n'
                yield "data: " + json.dumps({"type": "done", **body(data.get("var"))}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return body(data.get("var"))

    @app.post("/v1/perplexity")
    async def perplexity(req: Request):
        data = await req.json()
        seen.append(("perplexity", data))
        item = {"tokens": 10, "mean_nll": 1.0, "perplexity": 2.718}
        return {"mode": "var" if data.get("var", True) else "baseline", "results": [item], "overall": item}

    @app.post("/v1/completions")
    async def completions(req: Request):
        data = await req.json()
        seen.append(("completions", data))
        return {"choices": [{"text": "x"}], "usage": {"prompt_tokens": 3, "completion_tokens": 4},
                "mode": "var" if data.get("var", True) else "baseline"}

    @app.post("/var/toggle")
    async def toggle(req: Request):
        data = await req.json()
        seen.append(("toggle", {**data, "auth": req.headers.get("authorization")}))
        if req.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse({"error": {"type": "unauthorized"}}, 401)
        state["var"] = data["enabled"]
        return {"enabled": data["enabled"]}

    return app


@pytest.fixture(scope="module")
def stub():
    seen: list = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub_app(seen, "tok"), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    th.join(10)


def test_config_refuses_remote_targets_and_bad_values():
    with pytest.raises(ValueError, match="loopback"):
        LoadConfig(url="http://example.com:8000")
    LoadConfig(url="http://example.com:8000", allow_remote=True)
    with pytest.raises(ValueError, match="--mode"):
        LoadConfig(mode="chaos")
    with pytest.raises(ValueError, match="--users"):
        LoadConfig(users=0)
    cfg = LoadConfig(mode="toggle", users=3, max_new=(4, 8))
    assert LoadConfig.from_json(cfg.to_json()) == cfg
    cmd = locust_command(cfg, Path("/tmp/x"))
    assert cmd[-2:] == ["VarMoeUser", "ToggleUser"] and cmd[cmd.index("-u") + 1] == "4" and "--headless" in cmd
    assert "/tmp/x" in cmd and "/tmp/x.html" in cmd


def test_ab_run_pins_half_the_users_to_each_mode(stub, tmp_path):
    url, seen = stub
    seen.clear()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"prompt {i}", "kind": k}) + "\n" for i, k in enumerate(["short", "long"] * 5)))
    run = run_load(LoadConfig(url=url, users=4, spawn_rate=4, duration_s=5, mode="ab", out_dir=str(tmp_path / "out"),
                              prompts=str(prompts), max_new=(3, 5)), quiet=True)
    assert run.returncode == 0
    for p in (run.stats_csv, run.history_csv, run.html):
        assert p.exists() and p.stat().st_size > 0
    rows = read_request_log(run.requests_log)
    assert len(rows) == sum(1 for kind, _ in seen if kind != "toggle") > 20
    pins = [data.get("var") for kind, data in seen]
    assert None not in pins  # every request pinned in ab mode
    share = sum(pins) / len(pins)
    assert 0.25 < share < 0.75, share
    # each user keeps its mode: the log's pin and the server's answer agree
    assert all((r["mode"] == "var") == r["pin"] for r in rows if r["status"] == 200)
    assert {r["endpoint"] for r in rows} >= {"generate", "generate_stream"}
    assert all(r["generated_tokens"] == 4 for r in rows if r["endpoint"].startswith("generate"))
    assert summarize(rows)["status_5xx"] == 0
    names = run.stats_csv.read_text()
    assert "[var]" in names and "[baseline]" in names and "TTFT" in names


def test_toggle_mode_flips_with_the_admin_token(stub, tmp_path, monkeypatch):
    url, seen = stub
    seen.clear()
    monkeypatch.setenv("VARMOE_ADMIN_TOKEN", "tok")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "hello"}) + "\n")
    run_load(LoadConfig(url=url, users=2, spawn_rate=10, duration_s=4, mode="toggle", toggle_s=1.0,
                        out_dir=str(tmp_path / "out"), prompts=str(prompts)), quiet=True)
    toggles = [d for kind, d in seen if kind == "toggle"]
    assert len(toggles) >= 2
    assert all(t["auth"] == "Bearer tok" for t in toggles)
    assert [t["enabled"] for t in toggles[:2]] == [True, False]
    assert all("var" not in d for kind, d in seen if kind != "toggle")  # mix requests are not pinned


def test_toggle_mode_needs_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("VARMOE_ADMIN_TOKEN", raising=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="VARMOE_ADMIN_TOKEN"):
        run_load(LoadConfig(mode="toggle", prompts=str(prompts), out_dir=str(tmp_path)))


def _plain_locust(url: str, tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    """`locust -f loadtests/locustfile.py --host URL --headless ...` the way a Locust user starts it:
    the `locust` script, another working directory, no VARMOE_* settings unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VARMOE_")}
    locust = Path(sys.executable).with_name("locust")
    cmd = [str(locust), "-f", str(LOCUSTFILE), "--host", url, "--headless", "-u", "2", "-r", "2", "-t", "3s",
           "--stop-timeout", "5", "--only-summary"]
    return subprocess.run(cmd, env={**env, **env_extra}, cwd=tmp_path, capture_output=True, text=True, timeout=90)


def test_locustfile_runs_on_its_own_with_builtin_prompts(stub, tmp_path):
    url, seen = stub
    seen.clear()
    res = _plain_locust(url, tmp_path, {})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "VARMOE_LT_PROMPTS" not in res.stderr
    kinds = {kind for kind, _ in seen}
    assert len(seen) > 5 and "toggle" not in kinds  # no admin traffic unless --mode toggle
    builtin = {p["text"] for p in BUILTIN_PROMPTS}
    sent = [d.get("prompt", d.get("text")) for _, d in seen]
    assert sent and all(t in builtin for t in sent)


def test_prompt_file_in_the_environment_overrides_the_builtin_prompts(stub, tmp_path):
    url, seen = stub
    seen.clear()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "only this prompt"}) + "\n")
    res = _plain_locust(url, tmp_path, {"VARMOE_LT_PROMPTS": str(prompts)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert seen and {d.get("prompt", d.get("text")) for _, d in seen} == {"only this prompt"}


def test_runner_without_prompts_uses_the_builtin_ones(stub, tmp_path):
    url, seen = stub
    seen.clear()
    run = run_load(LoadConfig(url=url, users=2, spawn_rate=4, duration_s=3, out_dir=str(tmp_path / "out"),
                              max_new=(2, 3)), quiet=True)
    assert run.returncode == 0 and read_request_log(run.requests_log)
    assert {d.get("prompt", d.get("text")) for _, d in seen} <= {p["text"] for p in BUILTIN_PROMPTS}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):  # checked before Locust starts
        run_load(LoadConfig(url=url, prompts=str(bad), out_dir=str(tmp_path / "out2")))


def test_server_throughput_benchmark_runs_locust_through_the_same_launcher(stub, tmp_path, monkeypatch):
    """benchmarks/server_throughput.py keeps no Locust launcher of its own: it calls loadtests.run's."""
    import argparse

    import loadtests.run as lt_run
    from benchmarks import server_throughput as bench

    calls = []
    real = lt_run.launch_locust

    def spy(cmd, env, limit_s, **kw):
        calls.append(cmd)
        return real(cmd, env, limit_s, **kw)

    monkeypatch.setattr(bench, "launch_locust", spy)
    url, seen = stub
    seen.clear()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def f():", "import os"]))
    args = argparse.Namespace(run_time=4, warmup=0.5, new_tokens=4)
    cell = bench.locust_load(url, 2, args, prompts, tmp_path / "logs", "stub", tokenizer=None)
    assert len(calls) == 1 and str(bench.LOCUSTFILE) in calls[0] and "--headless" in calls[0]
    assert cell["clients"] == 2 and cell["requests"] >= 1 and cell["tokens"] == 4 * cell["requests"]
    assert all(kind == "completions" for kind, _ in seen)
