"""The engine: one thread owns the model; requests wait in a bounded queue and run in dynamic batches.

The HTTP side calls `submit(jobs)` from the event loop; the engine thread takes the oldest job
and forms a batch of up to `max_batch_size` jobs of its mode, which it runs through `BatchDecoder`
(decode.py). Before forming it, it waits until as many jobs of that mode are ready as were already
waiting when the previous batch ended plus that batch's rows (closed-loop clients send their next
request right after an answer, but not in the same millisecond), and at most until `max_wait_ms`
after the later of the oldest job's arrival and the previous batch's end. A lone client never
waits. Every batch runs in one mode: a pinned request (`var: true|false`) runs in its mode, the
others in the mode `VarRuntime` (var_runtime.py) says when the batch forms, so a toggle lands
between batches; the engine makes the routers match (`host.apply_mode`) and reports each batch to
the runtime (`record_batch`). Control actions (capture start/stop/export) also run on this thread
between batches, through `call()`, because they attach hooks to the model.

Per job: a deadline (timeout -> finish reason `timeout`), a `cancelled` flag set by the HTTP side
when the client disconnects (the row stops at the next step), stop strings, and an asyncio queue
of events (`("token", id, logprob)` for streams, then `("done", JobResult)`).

Back-pressure: more than `max_queue` waiting jobs -> `QueueFull` (HTTP 429 with Retry-After).
`stop()` refuses new work, lets queued and running jobs finish, then ends the thread.
Test: `pytest tests/test_server_engine.py`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .decode import BatchDecoder, RowSpec, RowState
from .metrics import ServerMetrics
from .model_host import ModelHost
from .var_runtime import VarRuntime

log = logging.getLogger("varmoe.server")


class EngineError(Exception):
    """A job could not be accepted; `retry_after_s` tells the client when to come back."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(EngineError):
    pass


class EngineStopping(EngineError):
    pass


@dataclass
class JobResult:
    state: RowState
    mode: str
    prompt_tokens: int
    queue_s: float
    ttft_s: float | None
    total_s: float
    tier_counts: dict[str, int]  # routing decisions of this request by tier (all layers)
    error: str | None = None


@dataclass
class Job:
    spec: RowSpec
    pinned_mode: str | None = None  # "var" | "baseline" | None (current mode)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    timeout_s: float = 120.0
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False  # set by the HTTP side; read by the engine thread between steps
    enqueued_at: float = 0.0
    first_token_at: float | None = None

    @property
    def deadline(self) -> float:
        return self.enqueued_at + self.timeout_s

    def post(self, *event: Any) -> None:
        """Hand an event to the request's event loop (thread-safe; a closed loop is ignored)."""
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # loop closed: the client is gone
            self.cancelled = True


class Engine:
    def __init__(self, host: ModelHost, var: VarRuntime, metrics: ServerMetrics, max_batch_size: int = 8,
                 max_wait_ms: float = 50.0, max_queue: int = 64, threads: int | None = None):
        self.host = host
        self.var = var
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.threads = threads
        tok = host.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.eos_id = tok.eos_token_id
        self._pending: collections.deque[Job] = collections.deque()
        self._controls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._returning = 0  # rows of the batch that just finished: clients likely to send again soon
        self._last_batch_end = 0.0
        self.batches_run = 0
        self.last_batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="varmoe-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Refuse new jobs, finish queued and running ones, end the thread; True if it ended in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True

    # -- called from the event loop -------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue all jobs or none (a perplexity list is one request)."""
        with self._cond:
            if self._stopping:
                raise EngineStopping("the server is shutting down", retry_after_s=5.0)
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(
                    f"queue full ({len(self._pending)} waiting, limit {self.max_queue}); retry later",
                    retry_after_s=max(1.0, self._retry_estimate()),
                )
            now = time.monotonic()
            for job in jobs:
                job.enqueued_at = now
                self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()

    def _retry_estimate(self) -> float:
        return round(len(self._pending) / max(1, self.max_batch_size) * 0.5, 1)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the engine thread between batches; returns a future of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                fut.set_exception(EngineStopping("the engine is not running"))
                return fut
            self._controls.append((fn, fut))
            self._cond.notify_all()
        return fut

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._pending and not self._controls and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._pending and not self._controls:
                    break
                controls = list(self._controls)
                self._controls.clear()
            for fn, fut in controls:
                try:
                    fut.set_result(fn())
                except Exception as exc:  # handed to the caller, who turns it into an HTTP error
                    fut.set_exception(exc)
            batch, mode = self._take_batch()
            if batch:
                self._run_batch(batch, mode)

    def _mode_of(self, job: Job) -> str:
        return self.var.mode_for(job.pinned_mode)

    def _take_batch(self) -> tuple[list[Job], str]:
        with self._cond:
            self._drop_cancelled()
            if not self._pending:
                return [], ""
            mode = self._mode_of(self._pending[0])
            # counted from the oldest job's arrival, or from the end of the last batch for its clients
            wait_until = max(self._pending[0].enqueued_at, self._last_batch_end) + self.max_wait_s
            # Wait for the clients of the batch that just finished: closed-loop clients send their next
            # request right after an answer, but the requests trickle in over some milliseconds. Without
            # this, a batch splits into cohorts that never merge again. A lone client never waits.
            # jobs that were already waiting when the last batch ended, plus that batch's clients
            earlier = sum(1 for j in self._pending if self._mode_of(j) == mode and j.enqueued_at < self._last_batch_end)
            target = min(self.max_batch_size, earlier + self._returning)
            self._returning = 0
            while not self._stopping and not self._controls:
                ready = sum(1 for j in self._pending if self._mode_of(j) == mode)
                remaining = wait_until - time.monotonic()
                if ready >= target or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, keep = [], collections.deque()
            for job in self._pending:
                if len(batch) < self.max_batch_size and self._mode_of(job) == mode and not job.cancelled:
                    batch.append(job)
                else:
                    keep.append(job)
            self._pending = keep
            self.metrics.queue_depth.set(len(self._pending))
        return batch, mode

    def _drop_cancelled(self) -> None:
        gone = [j for j in self._pending if j.cancelled]
        if gone:
            self._pending = collections.deque(j for j in self._pending if not j.cancelled)
            for j in gone:
                j.post("done", None)

    def _run_batch(self, jobs: list[Job], mode: str) -> None:
        started = time.monotonic()
        try:
            self.host.apply_mode(mode == "var")
            self.host.begin_batch()
            self.metrics.batch_size.observe(len(jobs))
            self.batches_run += 1
            self.last_batch_sizes.append(len(jobs))
            dec = BatchDecoder(self.host.model, [j.spec for j in jobs], self.pad_id, self.eos_id)
            self.metrics.prompt_tokens.labels(mode=mode).inc(sum(len(j.spec.prompt_ids) for j in jobs))
            self._deliver(jobs, dec, dec.prefill(), mode)
            while not dec.done:
                self._check_jobs(jobs, dec)
                if dec.done:
                    break
                self._deliver(jobs, dec, dec.step(), mode)
            valid_B = [st.forwarded_tokens for st in dec.state]
            rows = self.host.row_tier_counts(valid_B)
            self.var.record_batch(mode, sum(valid_B))
        except Exception as exc:  # a model error must not kill the engine or hang the clients
            log.exception("batch failed")
            for job in jobs:
                job.post("done", JobResult(RowState(), mode, len(job.spec.prompt_ids), 0.0, None,
                                           time.monotonic() - job.enqueued_at, {}, error=f"{type(exc).__name__}: {exc}"))
            return
        now = time.monotonic()
        self._returning, self._last_batch_end = len(jobs), now
        for job, st, row_tiers in zip(jobs, dec.state, rows):
            ttft = None if job.first_token_at is None else job.first_token_at - job.enqueued_at
            job.post("done", JobResult(st, mode, len(job.spec.prompt_ids), started - job.enqueued_at, ttft,
                                       now - job.enqueued_at, row_tiers))

    def _deliver(self, jobs: list[Job], dec: BatchDecoder, emitted: list[int | None], mode: str) -> None:
        now = time.monotonic()
        n = 0
        for job, tok, st in zip(jobs, emitted, dec.state):
            if tok is None:
                continue
            n += 1
            if job.first_token_at is None:
                job.first_token_at = now
                self.metrics.ttft.labels(mode=mode).observe(now - job.enqueued_at)
            if job.stream:
                job.post("token", tok, st.new_logprobs[-1])
        if n:
            self.metrics.generated_tokens.labels(mode=mode).inc(n)

    def _check_jobs(self, jobs: list[Job], dec: BatchDecoder) -> None:
        now = time.monotonic()
        tok = self.host.tokenizer
        for i, (job, st) in enumerate(zip(jobs, dec.state)):
            if st.finished:
                continue
            if job.cancelled:
                dec.finish(i, "cancelled")
            elif now > job.deadline:
                dec.finish(i, "timeout")
            elif job.stop and st.new_ids:
                # Decode only the tail that can hold a stop string: O(1) per step, not O(length).
                tail = tok.decode(st.new_ids[-(max(map(len, job.stop)) + 8):], skip_special_tokens=True)
                if any(s in tail for s in job.stop):
                    dec.finish(i, "stop")
