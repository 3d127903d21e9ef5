"""What the route modules share: `ServerState` (settings, model host, VAR runtime, engine, metrics),
the request checks every model route makes, running jobs on the engine, and the FastAPI
dependencies `get_state` and `require_admin`.

Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import threading
import time
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .engine_thread import EngineError, QueueFull, RequestTooLarge
from .errors import APIError, timeout_error
from .expert_metrics import ExpertLoadCollector
from .host import Host
from .jobs import Job, JobResult
from .metrics import ServerMetrics
from .settings import ServerSettings
from .var_runtime import VarRuntime


class ServerState:
    def __init__(self, settings: ServerSettings, host: Host, engine_class: type):
        self.settings = settings
        self.host = host
        self.var = VarRuntime(host, enabled=settings.var_on_start)
        self.metrics = ServerMetrics(self.var)
        self.engine = engine_class(host, self.var, self.metrics, settings.max_batch_size, settings.max_wait_ms,
                                   settings.max_queue, settings.threads,
                                   # a request larger than the queue gets 413, never 429 for ever
                                   max_request_rows=min(settings.max_request_prompts, settings.max_queue),
                                   max_request_tokens=settings.max_request_tokens)
        self.expert_load: ExpertLoadCollector | None = None
        if settings.expert_load_metrics or settings.expert_load_per_expert:
            shape = host.start_expert_load()  # (num_experts, tiers), None: this model has no counters
            if shape is not None:
                self.expert_load = ExpertLoadCollector(host.layers, shape[0], shape[1],
                                                       settings.expert_load_window_s, settings.expert_load_per_expert)
                self.metrics.registry.register(self.expert_load)
        self.started_at = time.time()
        self.shutdown_deadline: float | None = None
        self._tokenizer_lock = threading.Lock()
        self.context_len = int(getattr(host.model.config, "max_position_embeddings", None) or 10**9)
        self.prompt_limit = min(settings.max_prompt_tokens, self.context_len - 1)

    # -- shutdown: one grace period for open requests and the engine drain together -------------
    def begin_shutdown(self) -> None:
        if self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + self.settings.shutdown_grace_s

    def remaining_grace(self) -> float:
        if self.shutdown_deadline is None:
            return self.settings.shutdown_grace_s
        return max(0.0, self.shutdown_deadline - time.monotonic())

    # -- checks shared by the model routes ------------------------------------------------------
    def mode_for(self, pinned: bool | None, request: Request | None = None) -> str | None:
        """The pinned mode of a request. `var: true` is for A/B tests while VAR is on: once the admin
        turned VAR off it is refused (409), unless the request carries the admin token or the
        setting allow_var_pin_when_off is on; a wrong token is 403."""
        if pinned and not self.host.available:
            raise APIError(409, "var_unavailable", f"VAR is unavailable: {self.host.unavailable_reason}", "var")
        if pinned and not self.var.enabled and not self.settings.allow_var_pin_when_off:
            if request is not None and request.headers.get("authorization"):
                require_admin(request)  # 401/403 unless it is the admin's token
            else:
                raise APIError(409, "var_disabled", "the admin has turned VAR off; a request may pin var: true only "
                               "while VAR is enabled (or with the admin token)", "var")
        return None if pinned is None else ("var" if pinned else "baseline")

    async def in_worker(self, fn, *args) -> Any:
        """CPU work of a request (tokenizing, decoding, building a response) on a worker thread, so
        the event loop keeps answering /healthz and streams meanwhile."""
        return await run_in_threadpool(fn, *args)

    def tokenize(self, text: str, field: str, max_new: int = 0) -> list[int]:
        if len(text) > 64 * self.prompt_limit:  # refuse huge bodies before spending time tokenizing them
            raise APIError(413, "prompt_too_long",
                           f"the prompt has {len(text)} characters; the limit is {self.prompt_limit} tokens", field)
        with self._tokenizer_lock:  # worker threads share one tokenizer; its Rust side is not re-entrant
            ids = self.host.tokenizer(text)["input_ids"]
        self.check_prompt(ids, field, max_new)
        return ids

    def check_prompt(self, ids: list[int], field: str, max_new: int = 0, new_field: str = "max_new_tokens") -> None:
        if not ids:
            raise APIError(422, "invalid_request", "the prompt encodes to zero tokens", field)
        if len(ids) > self.prompt_limit:
            raise APIError(413, "prompt_too_long",
                           f"the prompt has {len(ids)} tokens; the limit is {self.prompt_limit}", field)
        vocab = int(self.host.model.config.vocab_size)  # the embedding's size, not the tokenizer's
        if max(ids) >= vocab:
            raise APIError(422, "invalid_request", f"token ids must be below the vocabulary size {vocab}", field)
        if len(ids) + max_new > self.context_len:
            raise APIError(422, "invalid_request",
                           f"prompt ({len(ids)}) + new tokens ({max_new}) exceed the context of {self.context_len}",
                           new_field)

    def check_max_new(self, n: int, field: str) -> None:
        if n > self.settings.max_new_tokens_limit:
            raise APIError(422, "invalid_request", f"{field} must be at most {self.settings.max_new_tokens_limit}", field)

    def observe(self, endpoint: str, mode: str, t0: float) -> None:
        self.metrics.request_duration.labels(endpoint=endpoint, mode=mode).observe(time.perf_counter() - t0)

    # -- running jobs ----------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs on the engine, their events going to this event loop (refusals: 413, 429, 503)."""
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.loop, job.events, job.timeout_s = loop, asyncio.Queue(), self.settings.request_timeout_s
        try:
            self.engine.submit(jobs)
        except RequestTooLarge as exc:
            raise APIError(413, "request_too_large", str(exc)) from None
        except EngineError as exc:
            status = 429 if isinstance(exc, QueueFull) else 503
            raise APIError(status, "overloaded" if status == 429 else "unavailable", str(exc),
                           headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}) from None

    async def run(self, request: Request, jobs: list[Job], endpoint: str) -> list[JobResult]:
        """Submit jobs, wait for all of them (the wait is `endpoint`'s request duration); cancel them if
        the client leaves or time runs out."""
        t0 = time.perf_counter()
        self.submit(jobs)
        waiter = asyncio.ensure_future(asyncio.gather(*(wait_done(j) for j in jobs)))
        gone = asyncio.ensure_future(wait_disconnect(request))
        done, _ = await asyncio.wait({waiter, gone}, timeout=self.settings.request_timeout_s + 2.0,
                                     return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if waiter not in done:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter  # collect the cancellation so it is not logged as an unretrieved error
            for job in jobs:
                job.cancelled = True
            if gone in done:
                raise APIError(499, "client_closed", "the client closed the connection")
            raise timeout_error(self.settings.request_timeout_s)
        results = waiter.result()
        for r in results:
            if r is None or r.state.finish_reason == "timeout":
                raise timeout_error(self.settings.request_timeout_s)
            if r.error:
                raise APIError(500, "engine_error", r.error)
        self.observe(endpoint, results[0].mode, t0)
        return results

    async def refresh_expert_load(self) -> None:
        """Read the engine's expert-load counters for this scrape: on the engine thread between steps
        when the host needs it (vLLM: a call to the workers), else from a worker thread (a copy of
        device counters). A read that fails or takes over 5 s keeps the previous reading."""
        if self.expert_load is None or not self.expert_load.counting:
            return
        read = self.host.expert_load_reading
        try:
            reading = await asyncio.wait_for(
                self.engine_call(read) if self.host.expert_load_on_engine else self.in_worker(read), 5.0)
        except (APIError, asyncio.TimeoutError):
            return
        if reading is not None and self.expert_load.counting:  # not switched off while it read
            self.expert_load.reading = reading

    async def switch_expert_load(self, on: bool) -> bool:
        """Count expert load or pause it (`POST /admin/expert-load`), from the next engine step; returns
        whether it was counting. Paused, /metrics leaves the expert-load families out (a gauge says so)."""
        if self.expert_load is None:
            raise APIError(409, "expert_load_unavailable", "this server counts no expert load (started with "
                           "--no-expert-load-metrics, or its model has no counters)", "enabled")
        if not self.host.expert_load_switchable:
            raise APIError(409, "expert_load_fixed", "this engine compiles the expert-load counting into its model "
                           "at start-up: restart it with --no-expert-load-metrics to leave the counting out", "enabled")
        previous = self.expert_load.counting
        if on != previous:
            def switch() -> Any:  # engine thread: the reading a resumed window starts from
                self.host.set_expert_load(on)
                return self.host.expert_load_reading() if on else None

            self.expert_load.set_counting(on, await self.engine_call(switch))
        return previous

    def check_routed_size(self, rows: list[tuple[int, int]], field: str = "return_routed_experts") -> None:
        """413 when the routed-experts arrays of `rows` ((prompt tokens, max new tokens) per choice)
        would make the response larger than max_response_bytes (JSON: digits and ", " per id)."""
        if not self.host.routed_available:
            raise APIError(409, "routed_experts_unavailable", "this engine's model was built without the routing "
                           f"buffers that return_routed_experts reads ({self.host.unavailable_reason})", field)
        k = self.host.top_k
        per_id = len(str(max(self.host.num_experts - 1, 0))) + 2
        tokens = sum(p + n for p, n in rows)
        size = tokens * (len(self.host.layers) * (k * per_id + 4 + 11) + 8)  # ids, and each row's tier name
        limit = self.settings.max_response_bytes
        if size > limit:
            raise APIError(413, "response_too_large",
                           f"the routed experts of {tokens} tokens x {len(self.host.layers)} MoE layers x top-{k} "
                           f"take about {size} bytes; the response limit is {limit} (setting max_response_bytes): "
                           "ask for fewer tokens or prompts", field)

    async def engine_call(self, fn) -> Any:
        """Run fn on the engine thread between batches (hooks on the model change only there)."""
        try:
            return await asyncio.wrap_future(self.engine.call(fn))
        except EngineError as exc:
            raise APIError(503, "unavailable", str(exc), headers={"Retry-After": "5"}) from None


async def wait_done(job: Job) -> JobResult | None:
    while True:
        event = await job.events.get()
        if event[0] == "done":
            return event[1]


async def wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the ASGI server sends http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- dependencies --------------------------------------------------------------------------------
def get_state(request: Request) -> ServerState:
    return request.app.state.varmoe


def require_admin(request: Request) -> None:
    """Admin routes: a Bearer token equal to VARMOE_ADMIN_TOKEN; none configured = refuse all."""
    token = get_state(request).settings.admin_token_value()
    if not token:
        raise APIError(403, "forbidden", "admin endpoints are disabled: no VARMOE_ADMIN_TOKEN is configured")
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise APIError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required",
                       "Authorization", headers={"WWW-Authenticate": "Bearer"})
