"""Overload (429 + Retry-After, recovery), request timeouts, and bad VAR tables at start-up."""

from __future__ import annotations

import pytest

from analysis_jobs import reliability_checks as rc
from analysis_jobs.fixtures import servable_var_model
from analysis_jobs.server_process import ManagedServer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return servable_var_model(tmp_path_factory.mktemp("model"))


def test_overload_gets_429_with_retry_after_and_recovers(model_dir, tmp_path):
    with ManagedServer(model_dir, args=["--max-queue", "4", "--max-batch-size", "2", "--no-var-on-start"], log_path=tmp_path / "s.log") as s:
        r = rc.check_overload(s, clients=16, phase_s=4.0)
    ov = r["phases"]["overload"]
    assert ov["status_429"] > 0 and ov["status_429_with_retry_after"] == ov["status_429"]
    assert r["ok"], r.get("why", "") + f"\n{r}"


def test_request_over_the_time_limit(model_dir, tmp_path):
    with ManagedServer(model_dir, args=["--request-timeout-s", "0.1"], log_path=tmp_path / "s.log") as s:
        r = rc.check_timeout(s, 0.1)
    assert r["plain"]["status"] == 408
    assert r["ok"], r.get("why", "") + f"\n{r}"


def test_bad_var_tables_are_refused_at_start(model_dir, tmp_path):
    r = rc.check_bad_tables(model_dir, tmp_path)
    for case in ("malformed", "mismatched"):
        assert r[case]["exit_code"] not in (0, None)
        assert not r[case]["traceback"]
    assert "vocab_size" in r["mismatched"]["message"] or "num_experts" in r["mismatched"]["message"]
    assert r["ok"], r.get("why", "")
