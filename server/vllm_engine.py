"""`VllmEngine`: the server's engine interface (submit / call / start / stop) over vLLM's LLMEngine.

One thread owns the `LLMEngine` (vllm_host.py): it admits queued jobs as vLLM requests, steps the
engine (vLLM batches continuously: requests join and leave between steps) and hands each job its
events like the builtin engine. A/B modes are per request, inside one batch: each job's mode
(pinned, else the admin's mode when it arrived) travels in its sampling parameters, and the workers
mark each token row with its request's mode (var_moe/vllm/rows.py); a toggle applies to requests
that arrive after it. A job returning its routed experts carries the key the workers file them
under (var_moe/vllm/expert_load.py). Cancelled or timed-out jobs are aborted in vLLM.
Test: `pytest tests/vllm_engine/test_vllm_server.py`.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from .engine_thread import EngineThread
from .host import StepHost
from .jobs import Job, JobResult, RowState

log = logging.getLogger("varmoe.server")
_ids = itertools.count()
COUNTS_EVERY_S = 0.5


def sampling_params(job: Job, routed_key: str | None = None) -> Any:
    """vLLM SamplingParams for one job (perplexity jobs generate one token that is thrown away), with
    its VAR mode for the workers' row marking, and the key its routed experts are filed under when it
    asked for them."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from var_moe.vllm.expert_load import ROUTED_KEY
    from var_moe.vllm.rows import MODE_KEY

    spec = job.spec
    return SamplingParams(
        max_tokens=max(1, spec.max_new_tokens), temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed,
        logprobs=spec.top_logprobs if spec.sampled_logprobs else None,
        prompt_logprobs=spec.top_logprobs if spec.prompt_logprobs else None,
        stop=job.stop or None, detokenize=bool(job.stop), output_kind=RequestOutputKind.DELTA,
        extra_args={MODE_KEY: job.mode == "var", **({ROUTED_KEY: routed_key} if routed_key else {})})


class _Flight:
    """A job that vLLM is running."""

    def __init__(self, job: Job):
        self.job = job
        self.state = RowState()
        self.prompt_done = False


class VllmEngine(EngineThread):
    thread_name = "varmoe-vllm-engine"
    mode_on_arrival = True
    host: StepHost

    def __init__(self, *args, **kwargs):  # EngineThread's arguments
        super().__init__(*args, **kwargs)
        self.llm = self.host.llm
        self._flights: dict[str, _Flight] = {}
        self.max_in_flight = 2 * self.max_batch_size
        self._var_unread = False  # VAR requests finished since the workers' counters were last read
        self._counts_read_at = 0.0

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Finish the work (EngineThread.stop), then shut vLLM's engine-core and worker processes down:
        uvicorn ends the server by re-raising SIGTERM, so exit handlers would not run, and the
        engine-core process (busy polling its queues) would outlive the server."""
        ended = super().stop(timeout_s)
        core = getattr(self.llm, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception:  # shutting down: log and go on
                log.exception("vLLM engine shutdown")
        return ended

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while self._wait_for_work(busy=lambda: bool(self._flights)):
            try:
                self._admit()
                if self._flights:
                    self._step()
            except Exception as exc:
                self._fail([fl.job for fl in self._flights.values()], "vLLM step failed", exc)
                self._abort_all()

    def _admit(self) -> None:
        """Hand queued jobs to vLLM in arrival order, up to twice its max_num_seqs in flight: vLLM
        schedules them itself, and keeping the rest here keeps --max-queue and the queue metric true."""
        with self._cond:
            self._drop_cancelled()
            admit = []
            while self._pending and len(self._flights) + len(admit) < self.max_in_flight:
                admit.append(self._pending.popleft())
            self.metrics.queue_depth.set(len(self._pending))
        now = time.monotonic()
        for job in admit:
            rid = f"varmoe-{next(_ids)}"
            # cache_salt: the prefix cache never hands a VAR request KV computed in baseline mode, nor the
            # reverse; a request returning its routed experts gets a salt of its own (every prompt row runs)
            salt = f"{job.mode}-{rid}" if job.routed else job.mode
            prompt = {"prompt_token_ids": list(job.spec.prompt_ids), "cache_salt": salt}
            self.llm.add_request(rid, prompt, sampling_params(job, rid if job.routed else None))
            self._started([job], now)
            self._flights[rid] = _Flight(job)

    def _step(self) -> None:
        self._abort_gone()
        outputs = self.llm.step()
        self.batches_run += 1
        self._observe_size(len(self._flights))
        now = time.monotonic()
        finished: dict[str, int] = {}  # mode -> tokens of the requests that finished in this step
        done: list[tuple[Job, JobResult]] = []
        routed = self._routed_rows(outputs)
        for out in outputs:
            fl = self._flights.get(out.request_id)
            if fl is None:
                continue
            self._take(fl, out, now, routed.get(out.request_id))
            if out.finished:
                del self._flights[out.request_id]
                done.append((fl.job, self._result(fl, out, now)))
                finished[fl.job.mode] = finished.get(fl.job.mode, 0) + fl.state.forwarded_tokens
        for mode, tokens in finished.items():
            self.var.record_batch(mode, tokens, read_counts=False)
        self._var_unread |= "var" in finished
        # Reading the workers' counters is a round trip through vLLM's engine core: at most every
        # COUNTS_EVERY_S under load (the device counters count VAR rows only, so late reads lose
        # nothing), and at once when nothing is left in flight, before the clients get their answers.
        if self._var_unread and (not self._flights or now - self._counts_read_at >= COUNTS_EVERY_S):
            self.var.pull_counts()
            self._var_unread, self._counts_read_at = False, now
        for job, result in done:
            job.finish(result)

    def _routed_rows(self, outputs: list) -> dict[str, list]:
        """Routed-experts rows so far of the requests in this step's outputs that asked for them and
        need them now (streams every step, the others when they finish): one call to the workers."""
        keys, finished = [], []
        for out in outputs:
            fl = self._flights.get(out.request_id)
            if fl is not None and fl.job.routed and (fl.job.stream or out.finished):
                keys.append(out.request_id)
                if out.finished:
                    finished.append(out.request_id)
        return self.host.take_routed(keys, finished) if keys else {}

    @staticmethod
    def _split_routed(job: Job, rows: list, tiers: list) -> dict[str, list]:
        """File a request's rows so far as prompt rows and generated tokens fed back; returns those
        new since the last call (a stream's token event carries them)."""
        n, had = len(job.spec.prompt_ids), len(job.gen_routing)

        def fast(part: list) -> list | None:  # each row's tier (0 fast, 1 learned), VAR mode only
            return [[t == 0 for t in r] for r in part] if job.mode == "var" else None

        first = job.prompt_routing is None
        prompt = job.add_routing(rows[:n], fast(tiers[:n]), prompt=True)
        extra = prompt if first else {}
        if rows[n + had:]:  # the rows of every step since the last output (one, unless outputs were held)
            extra |= job.add_routing(rows[n + had:], fast(tiers[n + had:]), prompt=False)
        return extra

    def _take(self, fl: _Flight, out: Any, now: float, routed: dict | None = None) -> None:
        job, st = fl.job, fl.state
        extra = None
        if routed is not None:  # [positions][layers][k]: the prompt's rows, then generated tokens fed back
            extra = self._split_routed(job, routed["experts"], routed["tiers"])
        if not fl.prompt_done and out.prompt_logprobs is not None:
            ids = job.spec.prompt_ids
            st.prompt_logprobs = [None] + [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]
            if job.spec.top_logprobs:
                st.prompt_top = [None] + [_top(d, job.spec.top_logprobs) for d in out.prompt_logprobs[1:]]
        fl.prompt_done = True
        if job.spec.max_new_tokens == 0:  # perplexity: the one generated token is not part of the answer
            return
        comp = out.outputs[0]
        new = list(comp.token_ids)
        if not new:
            return
        lps = comp.logprobs or [None] * len(new)
        for tok, d in zip(new, lps):
            st.new_ids.append(tok)
            st.new_logprobs.append(float(d[tok].logprob) if d is not None and tok in d else float("nan"))
            if job.spec.top_logprobs:
                st.new_top.append(_top(d, job.spec.top_logprobs) if d is not None else [])
            self._token(job, tok, st.new_logprobs[-1], extra, now)
            extra = None  # a step's rows travel with its first token
        self.metrics.generated_tokens.labels(mode=job.mode).inc(len(new))

    def _result(self, fl: _Flight, out: Any, now: float) -> JobResult:
        job, st = fl.job, fl.state
        comp = out.outputs[0]
        reason = comp.finish_reason or "length"
        if reason == "stop" and comp.stop_reason is None:
            reason = "eos"
        if reason == "abort":
            reason = "cancelled" if job.cancelled else "timeout"
        st.finished, st.finish_reason = True, reason
        # tokens this request sent through the model: the prompt less what the prefix cache held, then
        # every generated token but the last
        cached = int(getattr(out, "num_cached_tokens", 0) or 0)
        forwarded = list(job.spec.prompt_ids)[cached:] + st.new_ids[:-1]
        st.forwarded_tokens = len(forwarded)
        # the token before the first forwarded one: a pair entry of that row keys on it
        prev_id = job.spec.prompt_ids[cached - 1] if 0 < cached <= len(job.spec.prompt_ids) else -1
        tiers = self.host.request_tiers(job.mode == "var", forwarded, prev_id=prev_id)
        return job.result(st, now, tiers)

    def _abort_gone(self) -> None:
        now = time.monotonic()
        gone = {rid: reason for rid, fl in self._flights.items() if (reason := fl.job.stop_reason(now))}
        if not gone:
            return
        self.llm.abort_request(list(gone))
        for rid, reason in gone.items():
            fl = self._flights.pop(rid)
            fl.state.finished, fl.state.finish_reason = True, reason
            fl.job.finish(None if reason == "cancelled" else fl.job.result(fl.state, now))

    def _abort_all(self) -> None:
        """After a failed step (its clients answered): take every request out of vLLM."""
        if self._flights:
            try:
                self.llm.abort_request(list(self._flights))
            except Exception:  # the engine itself may be gone
                log.exception("abort after a failed step")
        self._flights.clear()


def _top(d: dict | None, n: int) -> list[tuple[int, float]]:
    if not d:
        return []
    pairs = sorted(((int(t), float(lp.logprob)) for t, lp in d.items()), key=lambda p: -p[1])
    return pairs[:n]
