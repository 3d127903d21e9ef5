"""`EngineThread`: what every engine shares -- a bounded queue of jobs, control actions run between
steps, one thread that owns the model, a draining stop, and the job bookkeeping around the model's
work (start, token events, answers, failure, with their metrics) -- plus the errors `submit` raises.

Subclasses (the builtin `Engine` in engine.py, `VllmEngine` in vllm_engine.py) implement `_run`,
the thread's loop. Test: `pytest tests/test_server_engine.py`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

from .jobs import Job, RowState
from .metrics import ServerMetrics
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


class RequestTooLarge(EngineError):
    """More prompts or more work (prompt + new tokens) in one request than the engine accepts."""


class EngineThread:
    thread_name = "varmoe-engine"
    mode_on_arrival = False  # True: a job's mode is fixed when it is queued, else when its batch forms

    def __init__(self, host: Any, var: VarRuntime, metrics: ServerMetrics, max_batch_size: int = 8,
                 max_wait_ms: float = 50.0, max_queue: int = 64, threads: int | None = None,
                 max_request_rows: int | None = None, max_request_tokens: int | None = None):
        self.host, self.var, self.metrics = host, var, metrics
        self.max_batch_size, self.max_wait_s, self.threads = max_batch_size, max_wait_ms / 1000.0, threads
        self.max_queue = max_queue
        self.max_request_rows, self.max_request_tokens = max_request_rows, max_request_tokens
        self._pending: collections.deque[Job] = collections.deque()
        self._requests = 0
        self._controls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self.last_batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
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
        """Queue all jobs or none (a perplexity list is one request), within the request's budget."""
        max_rows, max_tokens = self.max_request_rows, self.max_request_tokens
        if max_rows is not None and len(jobs) > max_rows:
            raise RequestTooLarge(f"{len(jobs)} prompts in one request; the limit is {max_rows}")
        work = sum(len(j.spec.prompt_ids) + j.spec.max_new_tokens for j in jobs)
        if max_tokens is not None and work > max_tokens:
            raise RequestTooLarge(f"the request asks for {work} tokens (prompt tokens + new tokens, all prompts); "
                                  f"the limit is {max_tokens}: send fewer prompts or fewer new tokens")
        with self._cond:
            if self._stopping:
                raise EngineStopping("the server is shutting down", retry_after_s=5.0)
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(
                    f"queue full ({len(self._pending)} waiting, limit {self.max_queue}); retry later",
                    retry_after_s=max(1.0, self._retry_estimate()),
                )
            now = time.monotonic()
            self._requests += 1
            for job in jobs:
                job.enqueued_at, job.request = now, self._requests
                if self.mode_on_arrival:
                    job.mode = self.var.mode_for(job.pinned_mode)
            self._pending.extend(jobs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()

    def _retry_estimate(self) -> float:
        return 1.0

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the engine thread between steps; returns a future of its result."""
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

    # -- for subclasses ------------------------------------------------------------------------
    def _wait_for_work(self, busy: Callable[[], bool] = lambda: False) -> bool:
        """Engine thread: sleep until there is a job, a control action or work in flight (`busy`),
        then run the queued control actions; False once stopping with nothing left to do."""
        with self._cond:
            while not self._pending and not self._controls and not busy() and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._pending and not self._controls and not busy():
                return False
            controls = list(self._controls)
            self._controls.clear()
        for fn, fut in controls:
            try:
                fut.set_result(fn())
            except Exception as exc:  # handed to the caller, who turns it into an HTTP error
                fut.set_exception(exc)
        return True

    def _drop_cancelled(self) -> None:
        """Answer and drop the waiting jobs whose client left (lock held)."""
        gone = [j for j in self._pending if j.cancelled]
        if gone:
            self._pending = collections.deque(j for j in self._pending if not j.cancelled)
            for j in gone:
                j.finish(None)

    def _started(self, jobs: list[Job], now: float) -> None:
        """`jobs` entered the model (their mode set)."""
        for job in jobs:
            job.started_at = now
            self.metrics.prompt_tokens.labels(mode=job.mode).inc(len(job.spec.prompt_ids))

    def _token(self, job: Job, tok: int, logprob: float, extra: dict | None, now: float) -> None:
        """One new token of `job`: its first is its time to first token; a stream gets each as an event
        (`extra`: the routed-experts fields that travel with it)."""
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.ttft.labels(mode=job.mode).observe(now - job.enqueued_at)
        if job.stream:
            job.post("token", tok, logprob, extra)

    def _observe_size(self, rows: int) -> None:
        self.metrics.batch_size.observe(rows)
        self.last_batch_sizes.append(rows)

    def _fail(self, jobs: list[Job], what: str, exc: Exception) -> None:
        """A model error must not kill the engine or hang the clients: log it, and answer every job of
        `jobs` not yet answered with it."""
        log.exception(what)
        error, now = f"{type(exc).__name__}: {exc}", time.monotonic()
        for job in jobs:
            if not job.posted:
                job.finish(job.result(RowState(), now, error=error))
