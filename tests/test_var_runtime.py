"""VarRuntime (server/var_runtime.py), the one owner of VAR mode and tier accounting, on a fake
backend: counts are attributed to the mode of the batch that added them, the switch refuses VAR
when the backend has none, status shows the mode in its config, and Prometheus exports exactly
the runtime's numbers.

Run: `pytest tests/test_var_runtime.py` (no model, milliseconds).
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import FakeBackend

from server.metrics import ServerMetrics
from server.var_runtime import VarRuntime, VarUnavailable


def test_counts_go_to_the_mode_of_the_batch():
    be = FakeBackend()
    be.add(l0_fast=5)  # decisions made before the runtime existed are not the server's
    rt = VarRuntime(be, enabled=True)
    be.add(l0_fast=3, l0_learned=1, l2_fast=2, l2_learned=2, l0_agree=1, l0_disagree=1)
    rt.record_batch("var", valid_tokens=4)
    rt.record_batch("baseline", valid_tokens=7)
    var, base = rt.tier_counts("var"), rt.tier_counts("baseline")
    assert var[(0, "fast")] == 3 and var[(0, "learned")] == 1 and var[(2, "fast")] == 2
    assert base == {(0, "fast"): 0, (0, "learned"): 7, (2, "fast"): 0, (2, "learned"): 7}
    assert rt.tier_counts()[(0, "learned")] == 8
    assert rt.verification_counts()[(0, "agree")] == 1
    be.add(l2_fast=4)
    rt.record_batch("var", valid_tokens=2)
    assert rt.tier_counts("var")[(2, "fast")] == 2 + 4  # the first batch's, plus only what was added since the last read


def test_deferred_reads_lose_nothing():
    """A backend whose counters count VAR work only may be read later (vLLM: a read is a round trip)."""
    be = FakeBackend()
    rt = VarRuntime(be, enabled=True)
    reads = []
    counts = be.counts
    be.counts = lambda: reads.append(1) or counts()  # noqa: E731
    be.add(l0_fast=2, l0_learned=1)
    rt.record_batch("var", valid_tokens=3, read_counts=False)
    be.add(l0_fast=1)
    rt.record_batch("var", valid_tokens=1, read_counts=False)
    assert not reads and rt.tier_counts("var")[(0, "fast")] == 0  # nothing read yet
    rt.pull_counts()
    assert len(reads) == 1 and rt.tier_counts("var")[(0, "fast")] == 3 and rt.tier_counts("var")[(0, "learned")] == 1
    assert rt.status()["batches_since_start"]["var"] == 2
    rt.pull_counts()
    assert rt.tier_counts("var")[(0, "fast")] == 3  # a second read adds only what is new


def test_switch_and_status_agree():
    rt = VarRuntime(FakeBackend(), enabled=True)
    assert rt.mode == "var" and rt.mode_for(None) == "var" and rt.mode_for("baseline") == "baseline"
    assert rt.set_enabled(False) is True
    s = rt.status()
    assert s["mode"] == "baseline" and s["var"]["config"]["enable_var"] is False
    rt.set_enabled(True)
    assert rt.status()["var"]["config"]["enable_var"] is True
    assert set(s["tier_shares_since_start"]) == {"var", "baseline"}


def test_no_var_backend_refuses_var_mode():
    rt = VarRuntime(FakeBackend(available=False), enabled=True)
    assert rt.mode == "baseline"  # asked for at start, but there is nothing to enable
    with pytest.raises(VarUnavailable, match="no tables"):
        rt.set_enabled(True)
    assert rt.status()["var"] == {"available": False, "layers": [0, 2], "unavailable_reason": "no tables"}


def test_prometheus_exports_the_runtime():
    be = FakeBackend()
    rt = VarRuntime(be, enabled=False)
    be.add(l0_fast=2, l2_learned=1, l2_agree=3)
    rt.record_batch("var", valid_tokens=1)
    rt.record_batch("baseline", valid_tokens=5)
    text = ServerMetrics(rt).exposition().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    key = lambda **kw: tuple(sorted(kw.items()))  # noqa: E731
    assert samples[("varmoe_routing_decisions_total", key(layer="0", tier="fast", mode="var"))] == 2
    assert samples[("varmoe_routing_decisions_total", key(layer="2", tier="learned", mode="baseline"))] == 5
    assert samples[("varmoe_verification_checks_total", key(layer="2", outcome="agree"))] == 3
    assert samples[("varmoe_var_enabled", ())] == 0
