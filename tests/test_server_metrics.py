"""Metrics and dashboards against real tools: `promtool check metrics` on the server's exposition,
and a real Prometheus (Debian package) scraping a real server, with every Grafana dashboard query
evaluated through Prometheus's HTTP API and required to return data.

Prometheus comes from `make prometheus` (part of `make test`); without promtool / prometheus on PATH
the tests skip, saying so.
Run: `pytest tests/test_server_metrics.py` (about 30 s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import httpx
import pytest
from server_helpers import shadowed_var_args

from analysis_jobs.server_process import REPO_ROOT, ManagedServer, free_port

DASHBOARD = REPO_ROOT / "docker" / "grafana" / "dashboards" / "varmoe-server.json"
TOKEN = "metrics-token"


def ensure_prometheus() -> None:
    """The tools come from `make prometheus` (which `make test` runs); tests install nothing."""
    if not (shutil.which("promtool") and shutil.which("prometheus")):
        pytest.skip("promtool / prometheus are not on PATH: install them with `make prometheus` (`make test` does)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, reference_model_dir):
    ensure_prometheus()
    tmp = tmp_path_factory.mktemp("metrics")
    model_dir = reference_model_dir
    # per-expert counters on: the dashboard's layer x expert heat map reads them
    with ManagedServer(model_dir, args=shadowed_var_args(model_dir, tmp) + ["--expert-load-per-expert"],
                       env={"VARMOE_ADMIN_TOKEN": TOKEN},
                       log_path=tmp / "server.log") as s:
        yield s


def traffic(url: str, seconds: float) -> None:
    """A little of everything: both modes, streaming, scoring, and some rejected requests."""
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as c:
        i = 0
        while time.monotonic() < end:
            c.post("/v1/generate", json={"prompt": "def main():\n", "max_new_tokens": 6, "var": bool(i % 2)})
            c.post("/v1/generate", json={"prompt": "import os", "max_new_tokens": 4, "stream": True})
            c.post("/v1/perplexity", json={"text": ["x = 1\ny = 2\n"]})
            c.post("/v1/generate", json={"prompt": "x", "temperature": -1})  # 422
            i += 1


def test_promtool_check_metrics(server):
    traffic(server.url, 1.0)
    exposition = httpx.get(server.url + "/metrics").text
    for name in ("varmoe_routing_decisions_total", "varmoe_generated_tokens_total", "varmoe_prompt_tokens_total",
                 "varmoe_request_duration_seconds_bucket", "varmoe_time_to_first_token_seconds_bucket",
                 "varmoe_var_enabled", "varmoe_verification_checks_total", "varmoe_queue_depth",
                 "varmoe_batch_size_bucket", "varmoe_requests_total", "varmoe_expert_load_imbalance",
                 "varmoe_expert_load_hottest_share", "varmoe_expert_load_dead_experts", "varmoe_routing_entropy_nats",
                 "varmoe_expert_load_window_tokens", "varmoe_expert_tokens_total"):
        assert f"\n{name}" in exposition, name
    res = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_prometheus_scrapes_server_and_every_dashboard_query_has_data(server, tmp_path):
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: varmoe\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    check = subprocess.run(["promtool", "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        worker = threading.Thread(target=traffic, args=(server.url, 8.0))
        worker.start()
        worker.join()
        time.sleep(2.0)  # one more scrape after the last request
        targets = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
        assert targets and all(t["health"] == "up" for t in targets), targets
        missing = []
        for title, expr in dashboard_queries():
            body = httpx.get(f"{api}/query", params={"query": expr}).json()
            assert body["status"] == "success", (title, expr, body)
            values = [float(r["value"][1]) for r in body["data"]["result"]]
            if not values or all(v != v for v in values):  # empty or all NaN
                missing.append((title, expr))
        assert not missing, f"dashboard queries without data: {missing}"
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()
