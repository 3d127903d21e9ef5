"""Reliability of the real server under fuzzing, faults and a short soak (bounded, seconds each).

One server (default settings) serves fuzz -> disconnects -> toggle -> soak, then receives SIGTERM
under load (the last test). Model: the reference model with VAR files, else a tiny one.
The full-length run is `python -m analysis_jobs.reliability --duration 120`.
"""

from __future__ import annotations

import pytest

from analysis_jobs import reliability_checks as rc
from analysis_jobs.fixtures import servable_var_model
from analysis_jobs.server_process import ManagedServer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return servable_var_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = ManagedServer(model_dir, log_path=tmp_path_factory.mktemp("log") / "server.log").wait_ready()
    yield s
    s.stop()


def explain(result: dict) -> str:
    return result.get("why", "") + f"\n{result}"


def test_fuzzing_finds_no_server_error(server, tmp_path):
    r = rc.check_fuzz(server, max_examples=5, max_time_s=25, report_dir=tmp_path)
    assert r["operations_tested"] >= 8  # every route of the OpenAPI schema
    assert r["ok"], explain(r)


def test_clients_leaving_mid_stream(server):
    r = rc.check_disconnects(server, streams=8)
    assert r["disconnected_streams"] == 8
    assert r["ok"], explain(r)


def test_toggling_every_second_under_load(server):
    r = rc.check_toggle(server, duration_s=5.0, clients=3)
    assert r["toggles"] >= 3 and r["requests"]["requests"] > 0
    assert r["modes"]["var"] > 0 and r["modes"]["baseline"] > 0  # both modes really served
    assert r["ok"], explain(r)


def test_short_soak(server):
    r = rc.check_soak(server, duration_s=15.0, clients=3)
    assert r["rss_samples"] >= 10
    assert r["ok"], explain(r)


def test_sigterm_under_load(server):
    r = rc.check_sigterm(server, clients=4, after_s=2.0)
    assert r["in_flight_at_sigterm"]["requests"] > 0, "SIGTERM came when nothing was in flight"
    assert r["ok"], explain(r)
    assert server.proc.poll() is not None
