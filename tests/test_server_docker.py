"""Container and dashboard files (Docker does not run here): compose, Dockerfile, Prometheus config
and Grafana provisioning parse and agree with each other and with the server's metric names.
The dashboard queries themselves run against a real Prometheus in tests/test_server_metrics.py.

Run: `pytest tests/test_server_docker.py` (seconds).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from server_helpers import FakeBackend

from analysis_jobs.server_process import REPO_ROOT
from server.expert_metrics import ExpertLoadCollector
from server.metrics import ServerMetrics
from server.var_runtime import VarRuntime
from var_moe.expert_load import LoadReading

DOCKER = REPO_ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "varmoe-server.json"


def test_compose_parses_and_mounts_existing_files():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    # the default stack; the vLLM engine is an opt-in profile
    assert {n for n, s in services.items() if not s.get("profiles")} == {"server", "prometheus", "grafana"}
    vllm = services["server-vllm"]
    assert vllm["profiles"] == ["vllm"] and vllm["environment"]["VARMOE_ENGINE"] == "vllm"
    assert "server" in vllm["networks"]["default"]["aliases"]  # scraped like the builtin server
    assert (REPO_ROOT / vllm["build"]["dockerfile"]).exists()
    assert (REPO_ROOT / services["server"]["build"]["dockerfile"]).exists()
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            host = volume.split(":")[0]
            assert (REPO_ROOT / host).exists(), volume
    for svc in services.values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port  # nothing opened beyond the host


def test_dockerfile_cpu_default_with_cuda_build_arg():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", text, re.M)
    assert "FROM ${BASE_IMAGE}" in text and "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert 'CMD ["varmoe", "serve"]' in text
    for src in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO_ROOT / src).exists() or src == "models/reference-moe", src


def test_prometheus_config_scrapes_server():
    cfg = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["server:8000"]
    if shutil.which("promtool"):
        res = subprocess.run(["promtool", "check", "config", str(DOCKER / "prometheus.yml")], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_provisioning_and_dashboard():
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    prov = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/varmoe.yml").read_text())["providers"][0]
    assert prov["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("tokens/s", "tier share", "latency", "first token", "var enabled", "verification",
                  "queue depth", "batch size", "error rate"):
        assert topic in titles, topic
    known = {m.name for m in ServerMetrics(VarRuntime(FakeBackend())).registry.collect()}
    # the expert-load collector (every family it can export: per tier and per expert included)
    load = ExpertLoadCollector([0, 1], 4, ("fast", "learned"), window_s=60.0, per_expert=True)
    load.reading = LoadReading(np.ones((2, 4), dtype=np.int64), np.ones(2), np.full(2, 2, dtype=np.int64),
                               np.ones((2, 2, 4), dtype=np.int64))
    known |= {m.name for m in load.collect()}
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"varmoe_[a-z_]+", target["expr"]))
            assert names, target["expr"]
            for name in names:
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                assert base in known, (name, panel["title"])


def _run_steps(text: str) -> list[str]:
    """The Dockerfile's RUN commands with their line continuations joined."""
    joined = text.replace("\\\n", " ")
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


@pytest.mark.parametrize("device,args,torch_index,extras", [
    ("cpu", {}, "https://download.pytorch.org/whl/cpu", ".[server]"),
    ("cuda", {}, "https://download.pytorch.org/whl/cu124", ".[server,gpu]"),
    ("cuda", {"TORCH_CUDA": "cu121"}, "https://download.pytorch.org/whl/cu121", ".[server,gpu]"),
    ("cuda", {"TORCH_INDEX": "https://mirror.example/whl/cu118"}, "https://mirror.example/whl/cu118", ".[server,gpu]"),
])
def test_dockerfile_pip_installs_honour_constraints_and_the_gpu_extra(tmp_path, device, args, torch_index, extras):
    """Run the Dockerfile's pip steps under sh with a fake pip that records its arguments."""
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^COPY constraints\.txt ", text, re.M)
    defaults = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))
    fake = tmp_path / "pip"
    fake.write_text('#!/bin/sh\necho "$@" >> "$PIP_LOG"\n')
    fake.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PIP_LOG": str(log), **defaults, "DEVICE": device, **args}
    steps = [s for s in _run_steps(text) if "pip install" in s]
    assert len(steps) == 2
    for step in steps:
        res = subprocess.run(["sh", "-c", step], env=env, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
    torch_line, package_line = log.read_text().splitlines()
    for line in (torch_line, package_line):
        assert "-c constraints.txt" in line, line  # the tested versions, in the image too
    assert torch_line.split()[-1] == torch_index and " torch " in f" {torch_line} "
    assert package_line.split()[-1] == extras


def test_dockerfile_refuses_an_unknown_device(tmp_path):
    text = (DOCKER / "Dockerfile").read_text()
    step = next(s for s in _run_steps(text) if "torch" in s)
    res = subprocess.run(["sh", "-c", step], env={"PATH": "/usr/bin:/bin", "DEVICE": "tpu", "TORCH_INDEX": "x"},
                         capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "DEVICE must be cpu or cuda" in res.stderr


def test_grafana_needs_an_admin_password_and_is_not_anonymous_by_default():
    env = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["grafana"]["environment"]
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    # `${VAR:?message}`: compose refuses to start without it (no default such as admin/admin)
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), password
    anonymous = str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false"))
    assert anonymous in ("false", "${GRAFANA_ANONYMOUS:-false}"), anonymous
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer") == "Viewer"  # when asked for, read-only
