"""The hardening probes (analysis_jobs/reliability_probes.py) on a real server, at a small scale:
each returns its figures; the oversized body is refused without the server's memory growing, and
a small request sent after a big one finishes first. Latency goals are reported by the probes
(`make reliability`), never asserted here: this machine is shared.

Run: `pytest tests/test_reliability_probes.py` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import pytest

from analysis_jobs import reliability_probes as rp
from analysis_jobs.server_process import ManagedServer


@pytest.fixture(scope="module")
def server(reference_model_dir, tmp_path_factory):
    s = ManagedServer(reference_model_dir, args=rp.PROBE_SERVER_ARGS,
                      log_path=tmp_path_factory.mktemp("probes") / "server.log").wait_ready()
    yield s
    s.stop()


def test_body_limit_probe(server):
    r = rp.probe_body_limit(server)
    assert r["status"] == 413 and r["body_mb"] > 20
    assert r["ok"], r
    assert r["healthz_samples"] > 0


def test_fairness_probe(server):
    r = rp.probe_fairness(server, prompts=16, new_tokens=200, small_after_s=0.5)
    assert r["big"]["status"] == 200 and r["small"]["status"] == 200
    assert r["small_finished_first"], r


def test_healthz_and_memory_probes_report_figures(server):
    h = rp.probe_healthz_echo(server, prompts=8, ids=200)
    assert h["status"] == 200 and h["healthz_samples"] > 0 and h["healthz_max_s"] > 0
    p = rp.probe_ppl_memory(server, texts=8, repeat=4, vocab_size=4096)
    assert p["status"] == 200 and p["rss_peak_mb"] >= p["rss_before_mb"] - 50 and p["full_logits_mb"] > 0
    lines = rp.summary_lines({"healthz_echo": h, "ppl_memory": p})
    assert len(lines) == 2 and "/healthz" in lines[0]
