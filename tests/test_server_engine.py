"""The engine thread (server/engine.py) in-process: batching limits, one VAR mode per batch, queue
bound, cancellation, timeouts and draining shutdown, on a tiny model with a real VAR wrapper.

Run: `pytest tests/test_server_engine.py` (seconds, CPU).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from server_helpers import FakeBackend, permissive_var_config

from analysis_jobs.fixtures import tiny_var_model
from server.engine import Engine
from server.engine_thread import QueueFull, RequestTooLarge
from server.jobs import Job, RowSpec
from server.metrics import ServerMetrics
from server.model_host import ModelHost
from server.settings import ServerSettings
from server.var_runtime import VarRuntime

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    d = tiny_var_model(tmp_path_factory.mktemp("engine") / "tiny")
    (d / "var.json").write_text(json.dumps(permissive_var_config()))
    # The real settings (not a stand-in that drifts from the fields ModelHost reads); explicit values
    # win over environment variables.
    settings = ServerSettings(model=str(d), dtype="float32", device="cpu", var_tables=str(d / "var" / "var_tables.safetensors"),
                              var_config=str(d / "var.json"), var_on_start=True)
    return ModelHost.load(settings)


def make_engine(host, **kw) -> Engine:
    var = VarRuntime(host, enabled=True)
    return Engine(host, var, ServerMetrics(var), **kw)


async def _collect(jobs):
    loop = asyncio.get_running_loop()
    for j in jobs:
        j.loop, j.events = loop, asyncio.Queue()
    return jobs


async def _results(jobs):
    out = []
    for j in jobs:
        while True:
            ev = await asyncio.wait_for(j.events.get(), 60)
            if ev[0] == "done":
                out.append(ev[1])
                break
    return out


def test_host_has_var(host):
    assert host.available, host.unavailable_reason


def test_loader_picks_the_engine_and_the_host_keeps_the_contract(host):
    from server.app import load_engine
    from server.host import BatchHost, Host, StepHost

    assert isinstance(host, BatchHost) and isinstance(host, Host) and host.can_capture
    assert not isinstance(host, StepHost)  # the check can fail: the builtin host has no vLLM engine
    assert not isinstance(FakeBackend(), Host)  # a RoutingBackend alone is not a host
    plain, engine_class = load_engine(ServerSettings(model=str(host.model_name), dtype="float32", device="cpu"))
    assert engine_class is Engine and isinstance(plain, BatchHost)


def test_batches_respect_max_size_and_one_mode(host):
    eng = make_engine(host, max_batch_size=3, max_wait_ms=200)

    async def main():
        jobs = [Job(RowSpec([5, 6, 7 + i], 4), pinned_mode=("var" if i % 2 else "baseline")) for i in range(8)]
        await _collect(jobs)
        eng.submit(jobs)  # queued before the thread starts: batches form from a full queue
        eng.start()
        return jobs, await _results(jobs)

    jobs, results = asyncio.run(main())
    eng.stop()
    assert max(eng.last_batch_sizes) <= 3
    assert sum(eng.last_batch_sizes) == 8
    for job, res in zip(jobs, results):
        assert res.mode == job.pinned_mode
        if res.mode == "baseline":
            assert res.tier_counts["fast"] == 0
        decisions = sum(res.tier_counts.values())
        assert decisions == (len(job.spec.prompt_ids) + len(res.state.new_ids) - 1) * len(host.layers)
    # 4 baseline + 4 VAR jobs with at most 3 per batch and one mode per batch: at least 4 batches
    assert eng.batches_run >= 4


def test_var_and_baseline_greedy_counts(host):
    """VAR mode uses the fast tier for some tokens; baseline counts every decision as learned."""
    eng = make_engine(host, max_batch_size=4, max_wait_ms=1)
    eng.start()

    async def main():
        ids = host.tokenizer("def forward(self, x):\n    return self")["input_ids"]
        jobs = [Job(RowSpec(ids, 6), pinned_mode=m) for m in ("var", "baseline")]
        await _collect(jobs)
        eng.submit(jobs)
        return await _results(jobs)

    var, base = asyncio.run(main())
    eng.stop()
    assert var.tier_counts["fast"] > 0
    assert base.tier_counts["learned"] == sum(base.tier_counts.values())


def test_queue_bound_cancel_timeout_and_drain(host):
    eng = make_engine(host, max_batch_size=1, max_wait_ms=0, max_queue=2)

    async def main():
        long = Job(RowSpec([5, 6, 7], 200))
        cancel_me = Job(RowSpec([5, 6, 8], 200))
        await _collect([long, cancel_me])
        eng.submit([long, cancel_me])
        with pytest.raises(QueueFull):
            eng.submit([Job(RowSpec([1, 2], 1))])
        cancel_me.cancelled = True  # still queued: dropped without running
        long.timeout_s = 0.0  # already past its deadline: stops at the first check
        eng.start()
        res_long, res_cancel = await _results([long, cancel_me])
        late = Job(RowSpec([5, 6, 9], 3))
        await _collect([late])
        eng.submit([late])
        return res_long, res_cancel, late

    res_long, res_cancel, late = asyncio.run(main())
    assert res_cancel is None
    assert res_long.state.finish_reason == "timeout" and len(res_long.state.new_ids) < 200
    t0 = time.monotonic()
    assert eng.stop(timeout_s=30)  # drains the queued job before the thread ends
    assert time.monotonic() - t0 < 30
    assert late.first_token_at is not None


def test_lone_client_never_waits_for_the_batch_window(host):
    """max_wait_ms only holds a batch for clients of the batch that just ended; one client sending
    requests back to back must not pay the window (here 2 s) on any of them."""
    eng = make_engine(host, max_batch_size=8, max_wait_ms=2000)
    eng.start()

    async def main():
        waits = []
        for i in range(3):
            (job,) = await _collect([Job(RowSpec([5, 6, 7 + i], 3), pinned_mode="baseline")])
            eng.submit([job])
            (res,) = await _results([job])
            waits.append(res.queue_s)
        return waits

    waits = asyncio.run(main())
    eng.stop()
    assert max(waits) < 1.0, waits


def test_small_request_finishes_before_a_big_one_sent_earlier(host):
    """Fair scheduling: a 4-token request sent while a 16 x 200-token one runs joins the running
    batch and is answered long before the big one, and routing counts stay exact per row."""
    eng = make_engine(host, max_batch_size=4, max_wait_ms=1)
    eng.start()

    async def main():
        big = [Job(RowSpec([5, 6, 7 + i % 5], 200)) for i in range(16)]
        await _collect(big)
        eng.submit(big)
        while big[0].first_token_at is None:  # the big request holds the engine
            await asyncio.sleep(0.005)
        (small,) = await _collect([Job(RowSpec([9, 8, 7], 4))])
        eng.submit([small])
        done_at = {}

        async def wait(name, jobs):
            res = await _results(jobs)
            done_at[name] = time.monotonic()
            return res

        big_res, (small_res,) = await asyncio.gather(wait("big", big), wait("small", [small]))
        return big, big_res, small, small_res, done_at

    big, big_res, small, small_res, done_at = asyncio.run(main())
    eng.stop()
    assert done_at["small"] < done_at["big"]
    big_total = max(r.total_s for r in big_res)
    assert small_res.total_s < 0.25 * big_total, (small_res.total_s, big_total)
    assert len(small_res.state.new_ids) == 4
    for job, res in [(small, small_res)] + list(zip(big, big_res)):
        decisions = sum(res.tier_counts.values())
        assert decisions == (len(job.spec.prompt_ids) + len(res.state.new_ids) - 1) * len(host.layers)
    assert max(eng.last_batch_sizes) <= 2 * 4


def test_request_size_limits(host):
    eng = make_engine(host, max_request_rows=4, max_request_tokens=100)
    with pytest.raises(RequestTooLarge, match="prompts"):
        eng.submit([Job(RowSpec([5, 6], 1)) for _ in range(5)])
    with pytest.raises(RequestTooLarge, match="limit is 100"):
        eng.submit([Job(RowSpec([5, 6], 49)), Job(RowSpec([5, 6], 48))])  # 51 + 50 tokens
    eng.submit([Job(RowSpec([5, 6], 48)), Job(RowSpec([5, 6], 48))])  # 100: accepted
    assert eng.queue_depth == 2


def test_a_new_batch_never_exceeds_max_batch_size_with_many_requests(host):
    """Forming a batch takes at most max_batch_size rows even from many one-row requests (only
    joining a running batch may go beyond, for a request with nothing running)."""
    eng = make_engine(host, max_batch_size=3, max_wait_ms=1)

    async def main():
        jobs = [Job(RowSpec([5, 6, 7 + i], 2), pinned_mode="baseline") for i in range(7)]
        await _collect(jobs)
        for j in jobs:
            eng.submit([j])  # seven requests, queued before the thread starts
        eng.start()
        return await _results(jobs)

    results = asyncio.run(main())
    eng.stop()
    assert all(r is not None and len(r.state.new_ids) == 2 for r in results)
    assert eng.last_batch_sizes[0] == 3
    assert max(eng.last_batch_sizes) <= 6
