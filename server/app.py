"""The HTTP layer: FastAPI routes, status codes and error bodies around the engine.

`create_app(settings, runtime=None)` loads the model (unless a `RoutingRuntime` is given), starts
the engine thread on start-up and drains it on shutdown. Routes:

  POST /v1/generate      text (+ SSE stream), timings, routing tier counts of the request
  POST /v1/perplexity    one text or a list; tokens, mean NLL, perplexity per text and overall
  POST /v1/completions   OpenAI-compatible (openai_compat.py), incl. echo + logprobs scoring
  GET  /v1/models        the one served model (OpenAI clients ask)
  POST /var/toggle       admin: {"enabled": bool}, lands between batches
  GET  /var/status       mode, config, table sizes, tier shares and verification since start
  POST /admin/capture/start | /admin/capture/stop, GET /admin/capture/stats (Parquet)
  GET  /healthz, /readyz, /metrics

Errors are JSON `{"error": {"type", "message", "field"}}`: 400 malformed JSON, 401/403 admin
auth, 408 timeout, 409 VAR unavailable, 413 prompt too long, 422 invalid field, 429 queue full
(Retry-After), 503 shutting down (Retry-After). Run: `varmoe serve`. Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_compat
from .decode import RowSpec
from .engine import Engine, EngineError, Job, JobResult, QueueFull, RequestTooLarge
from .limits import BodyLimit
from .metrics import TIERS, ServerMetrics
from .schemas import MAX_TEXTS, CompletionRequest, GenerateRequest, PerplexityRequest, ToggleRequest
from .settings import ServerSettings
from .var_runtime import RoutingRuntime

log = logging.getLogger("varmoe.server")


class APIError(Exception):
    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type_, message, field, headers


def error_response(status: int, type_: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message, "field": field}}, status, headers=headers)


class RequestCounter:
    """ASGI middleware counting every answer in varmoe_requests_total{endpoint,status}."""

    def __init__(self, app, metrics: ServerMetrics, known_paths: set[str]):
        self.app, self.metrics, self.known = app, metrics, known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"] if scope["path"] in self.known else "other"
            self.metrics.requests.labels(endpoint=path, status=str(status["code"])).inc()


class ServerState:
    """What the routes share: settings, runtime, engine, metrics, counters since start."""

    def __init__(self, settings: ServerSettings, runtime: RoutingRuntime):
        self.settings = settings
        self.runtime = runtime
        self.metrics = ServerMetrics(runtime.layers, verification=runtime.var_available)
        self.engine = Engine(runtime, self.metrics, settings.max_batch_size, settings.max_wait_ms,
                             settings.max_queue, settings.threads, max_request_rows=settings.max_request_prompts,
                             max_request_tokens=settings.max_request_tokens)
        self.started_at = time.time()
        self.shutdown_deadline: float | None = None
        ctx = getattr(runtime.base_model.config, "max_position_embeddings", None) or 10**9
        self.context_len = int(ctx)
        self.prompt_limit = min(settings.max_prompt_tokens, self.context_len - 1)

    # -- shutdown: one grace period for open requests and the engine drain together -----------------
    def begin_shutdown(self) -> None:
        if self.shutdown_deadline is None:
            self.shutdown_deadline = time.monotonic() + self.settings.shutdown_grace_s

    def remaining_grace(self) -> float:
        if self.shutdown_deadline is None:
            return self.settings.shutdown_grace_s
        return max(0.0, self.shutdown_deadline - time.monotonic())

    # -- helpers shared by the model routes ---------------------------------------------------------
    def mode_for(self, pinned: bool | None) -> str | None:
        if pinned and not self.runtime.var_available:
            raise APIError(409, "var_unavailable", f"VAR is unavailable: {self.runtime.unavailable_reason}", "var")
        return None if pinned is None else ("var" if pinned else "baseline")

    def tokenize(self, text: str, field: str) -> list[int]:
        if len(text) > 64 * self.prompt_limit:  # refuse huge bodies before spending time tokenizing them
            raise APIError(413, "prompt_too_long",
                           f"the prompt has {len(text)} characters; the limit is {self.prompt_limit} tokens", field)
        ids = self.runtime.tokenizer(text)["input_ids"]
        self.check_prompt(ids, field)
        return ids

    def check_prompt(self, ids: list[int], field: str, max_new: int = 0, new_field: str = "max_new_tokens") -> None:
        if not ids:
            raise APIError(422, "invalid_request", "the prompt encodes to zero tokens", field)
        if len(ids) > self.prompt_limit:
            raise APIError(413, "prompt_too_long",
                           f"the prompt has {len(ids)} tokens; the limit is {self.prompt_limit}", field)
        vocab = int(self.runtime.base_model.config.vocab_size)  # the embedding's size, not the tokenizer's
        if max(ids) >= vocab:
            raise APIError(422, "invalid_request", f"token ids must be below the vocabulary size {vocab}", field)
        if len(ids) + max_new > self.context_len:
            raise APIError(422, "invalid_request",
                           f"prompt ({len(ids)}) + new tokens ({max_new}) exceed the context of {self.context_len}",
                           new_field)

    def check_max_new(self, n: int, field: str) -> None:
        if n > self.settings.max_new_tokens_limit:
            raise APIError(422, "invalid_request", f"{field} must be at most {self.settings.max_new_tokens_limit}", field)

    async def run(self, request: Request, jobs: list[Job]) -> list[JobResult]:
        """Submit jobs, wait for all of them; cancel them if the client leaves or time runs out."""
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.loop, job.events, job.timeout_s = loop, asyncio.Queue(), self.settings.request_timeout_s
        submit(self.engine, jobs)
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
        return results


def timeout_error(limit: float) -> APIError:
    return APIError(408, "timeout", f"the request did not finish within request_timeout_s={limit:g}")


def submit(engine: Engine, jobs: list[Job]) -> None:
    try:
        engine.submit(jobs)
    except RequestTooLarge as exc:
        raise APIError(413, "request_too_large", str(exc), "prompt") from None
    except EngineError as exc:
        status = 429 if isinstance(exc, QueueFull) else 503
        raise APIError(status, "overloaded" if status == 429 else "unavailable", str(exc),
                       headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}) from None


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


def create_app(settings: ServerSettings | None = None, runtime: RoutingRuntime | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    runtime = runtime or RoutingRuntime.load(settings)
    state = ServerState(settings, runtime)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        yield
        # uvicorn has stopped accepting connections and waited for open ones; drain the rest within
        # what is left of the one grace period (the clock starts when uvicorn's shutdown begins).
        state.begin_shutdown()
        await asyncio.get_running_loop().run_in_executor(None, state.engine.stop, state.remaining_grace())

    app = FastAPI(title="var-moe inference server", version="0.1.0", lifespan=lifespan)
    app.state.varmoe = state
    install_error_handlers(app)

    def require_admin(request: Request) -> None:
        token = settings.admin_token_value()
        if not token:
            raise APIError(403, "forbidden", "admin endpoints are disabled: no VARMOE_ADMIN_TOKEN is configured")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise APIError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required",
                           "Authorization", headers={"WWW-Authenticate": "Bearer"})

    # -- health ---------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not state.engine.running:
            return error_response(503, "not_ready", "the engine is not running", headers={"Retry-After": "5"})
        return {"status": "ready", "model": runtime.model_name, "var_available": runtime.var_available}

    @app.get("/metrics")
    async def metrics():
        state.metrics.queue_depth.set(state.engine.queue_depth)
        return Response(state.metrics.exposition(), media_type=state.metrics.content_type)

    # -- model endpoints ----------------------------------------------------------------------------
    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request):
        state.check_max_new(body.max_new_tokens, "max_new_tokens")
        ids = state.tokenize(body.prompt, "prompt")
        state.check_prompt(ids, "prompt", body.max_new_tokens)
        spec = RowSpec(ids, body.max_new_tokens, body.temperature, body.top_p, body.seed)
        job = Job(spec, pinned_mode=state.mode_for(body.var), stop=body.stop or [], stream=body.stream)
        if body.stream:
            return await stream_generate(state, request, job)
        t0 = time.perf_counter()
        (result,) = await state.run(request, [job])
        state.metrics.request_duration.labels(endpoint="/v1/generate", mode=result.mode).observe(time.perf_counter() - t0)
        return generate_body(state, result, job)

    @app.post("/v1/perplexity")
    async def perplexity(body: PerplexityRequest, request: Request):
        texts = [body.text] if isinstance(body.text, str) else body.text
        if len(texts) > MAX_TEXTS:
            raise APIError(422, "invalid_request", f"at most {MAX_TEXTS} texts per request", "text")
        mode = state.mode_for(body.var)
        jobs = []
        for i, text in enumerate(texts):
            field = "text" if isinstance(body.text, str) else f"text[{i}]"
            ids = state.tokenize(text, field)
            if len(ids) < 2:
                raise APIError(422, "invalid_request", "a text needs at least 2 tokens to have a perplexity", field)
            jobs.append(Job(RowSpec(ids, 0, prompt_logprobs=True), pinned_mode=mode))
        t0 = time.perf_counter()
        results = await state.run(request, jobs)
        state.metrics.request_duration.labels(endpoint="/v1/perplexity", mode=results[0].mode).observe(time.perf_counter() - t0)
        items, total_nll, total_n = [], 0.0, 0
        for r in results:
            lps = r.state.prompt_logprobs[1:]
            nll = -float(sum(lps))
            items.append(ppl_item(nll, len(lps)))
            total_nll, total_n = total_nll + nll, total_n + len(lps)
        return {"mode": results[0].mode, "results": items, "overall": ppl_item(total_nll, total_n)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = openai_compat.prompt_ids(state, body)
        state.check_max_new(body.max_tokens, "max_tokens")
        mode = state.mode_for(body.var)
        stops = [s for s in ([body.stop] if isinstance(body.stop, str) else (body.stop or [])) if s]  # "" stops nothing
        jobs = []
        for i, ids in enumerate(prompts):
            state.check_prompt(ids, "prompt" if len(prompts) == 1 else f"prompt[{i}]", body.max_tokens, "max_tokens")
            n_top = body.logprobs or 0
            spec = RowSpec(ids, body.max_tokens, body.temperature, body.top_p, body.seed,
                           prompt_logprobs=body.echo and body.logprobs is not None, top_logprobs=n_top)
            jobs.append(Job(spec, pinned_mode=mode, stop=stops))
        t0 = time.perf_counter()
        results = await state.run(request, jobs)
        state.metrics.request_duration.labels(endpoint="/v1/completions", mode=results[0].mode).observe(time.perf_counter() - t0)
        return openai_compat.completion_body(state.runtime, body, prompts, results, stops)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": runtime.model_name, "object": "model", "owned_by": "var-moe"}]}

    # -- VAR control --------------------------------------------------------------------------------
    @app.post("/var/toggle", dependencies=[Depends(require_admin)])
    async def toggle(body: ToggleRequest):
        if body.enabled and not runtime.var_available:
            raise APIError(409, "var_unavailable", f"VAR is unavailable: {runtime.unavailable_reason}", "enabled")
        previous = state.engine.var_mode
        state.engine.set_var(body.enabled)
        return {"enabled": body.enabled, "previous": previous, "applies": "from the next batch"}

    @app.get("/var/status")
    async def var_status():
        return var_status_body(state)

    # -- capture from live traffic ------------------------------------------------------------------
    @app.post("/admin/capture/start", dependencies=[Depends(require_admin)])
    async def capture_start():
        ok, reason = runtime.capture_available()
        if not ok:
            raise APIError(409, "capture_unavailable", reason)
        await engine_call(state, runtime.capture_start)
        return {"capturing": True, "note": "statistics restart from zero at every start"}

    @app.post("/admin/capture/stop", dependencies=[Depends(require_admin)])
    async def capture_stop():
        await engine_call(state, runtime.capture_stop)
        return {"capturing": False, "tokens": runtime.capture_tokens,
                "note": "GET /admin/capture/stats downloads the statistics as Parquet"}

    @app.get("/admin/capture/stats", dependencies=[Depends(require_admin)])
    async def capture_stats(part: Literal["stats", "pairs"] = "stats"):
        """The statistics file of `varmoe capture` (part=stats) or its pair sidecar (part=pairs)."""
        if runtime.analyzer is None:
            raise APIError(409, "no_capture", "no capture has been started on this server")
        tmp = Path(tempfile.mkdtemp(prefix="varmoe-capture-")) / "routing_stats.parquet"
        await engine_call(state, lambda: runtime.capture_parquet(tmp))
        path = tmp if part == "stats" else tmp.with_name("routing_stats.pairs.parquet")
        cleanup = BackgroundTask(shutil.rmtree, tmp.parent, ignore_errors=True)
        if not path.exists():
            cleanup.func(*cleanup.args, **cleanup.kwargs)
            raise APIError(404, "not_found", f"this capture has no {part} file", "part")
        return FileResponse(path, media_type="application/vnd.apache.parquet", filename=path.name, background=cleanup)

    known = {r.path for r in app.routes if hasattr(r, "path")}
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestCounter, metrics=state.metrics, known_paths=known)  # outermost: counts 413/408 too
    return app


async def engine_call(state: ServerState, fn) -> Any:
    try:
        return await asyncio.wrap_future(state.engine.call(fn))
    except EngineError as exc:
        raise APIError(503, "unavailable", str(exc), headers={"Retry-After": "5"}) from None


def ppl_item(nll: float, n: int) -> dict[str, float]:
    mean = nll / max(1, n)
    return {"tokens": n, "mean_nll": mean, "perplexity": math.exp(min(mean, 700.0))}


def routing_body(tier_counts: dict[str, int]) -> dict[str, int]:
    """Routing decisions of one request (valid tokens x MoE layers), by tier."""
    return {t: int(tier_counts.get(t, 0)) for t in TIERS}


def generate_body(state: ServerState, result: JobResult, job: Job) -> dict[str, Any]:
    text = state.runtime.tokenizer.decode(result.state.new_ids, skip_special_tokens=True)
    reason = result.state.finish_reason or "length"
    if reason == "stop":
        cut = min((text.find(s) for s in job.stop if s in text), default=-1)
        text = text[:cut] if cut >= 0 else text
    return {
        "text": text, "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.state.new_ids),
        "finish_reason": reason, "mode": result.mode,
        "timings": {"queue_s": result.queue_s, "ttft_s": result.ttft_s, "total_s": result.total_s},
        "routing": routing_body(result.tier_counts),
    }


async def stream_generate(state: ServerState, request: Request, job: Job) -> StreamingResponse:
    """Server-sent events: one `token` event per new token, then `done` with the full body."""
    loop = asyncio.get_running_loop()
    job.loop, job.events, job.timeout_s = loop, asyncio.Queue(), state.settings.request_timeout_s
    submit(state.engine, [job])  # errors (429/503) happen before the stream starts
    tok = state.runtime.tokenizer
    t0 = time.perf_counter()

    async def events():
        ids: list[int] = []
        sent = ""
        try:
            while True:
                event = await asyncio.wait_for(job.events.get(), state.settings.request_timeout_s + 2.0)
                if event[0] == "token":
                    ids.append(event[1])
                    text = tok.decode(ids, skip_special_tokens=True)
                    delta = ""
                    if not text.endswith("\ufffd"):  # half a UTF-8 character: its text comes with the rest
                        delta, sent = text[len(sent):], text
                    yield sse({"type": "token", "token_id": event[1], "text": delta, "logprob": event[2]})
                    continue
                result = event[1]
                if result is None or result.error:
                    msg = "cancelled or timed out" if result is None else result.error
                    yield sse({"type": "error", "error": {"type": "engine_error", "message": msg}})
                else:
                    state.metrics.request_duration.labels(endpoint="/v1/generate", mode=result.mode).observe(
                        time.perf_counter() - t0)
                    yield sse({"type": "done", **generate_body(state, result, job)})
                yield "data: [DONE]\n\n"
                return
        except asyncio.TimeoutError:
            yield sse({"type": "error", "error": {"type": "timeout", "message": "request timed out"}})
        finally:
            job.cancelled = True  # a no-op when finished; stops the row when the client left early

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def counter_by_layer(counter, label: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in counter.collect()[0].samples:
        if s.name.endswith("_total"):
            out.setdefault(s.labels["layer"], {})[s.labels[label]] = int(s.value)
    return out


def var_status_body(state: ServerState) -> dict[str, Any]:
    rt = state.runtime
    per_layer: dict[str, dict[str, float]] = {}
    for layer, counts in counter_by_layer(state.metrics.routing_decisions, "tier").items():
        total = sum(counts.values())
        per_layer[layer] = {t: (counts.get(t, 0) / total if total else 0.0) for t in TIERS}
    checks = counter_by_layer(state.metrics.verification_checks, "outcome")
    agreement = {layer: (c.get("agree", 0.0) / sum(c.values()) if sum(c.values()) else None) for layer, c in checks.items()}
    return {
        "mode": "var" if state.engine.var_mode else "baseline",
        "var": rt.status(),
        "tier_shares_since_start": per_layer,
        "verification_checks_since_start": checks,
        "verification_agreement": agreement,
        "capturing": rt.capturing,
        "batches_run": state.engine.batches_run,
        "uptime_s": time.time() - state.started_at,
    }


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404 / 405 in the same shape
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, f"{request.method} {request.url.path}: {exc.detail}",
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return validation_response(exc.errors())


def validation_response(errors) -> JSONResponse:
    errors = list(errors)
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    if first.get("type") == "prompt_too_long":
        return error_response(413, "prompt_too_long", f"{field}: {first.get('msg')}", field)
    if first.get("type") == "json_invalid":
        return error_response(400, "malformed_json", f"the body is not valid JSON: {first.get('msg')}", "body")
    if field == "body" and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return error_response(400, "malformed_json",
                              "the body must be a JSON object (send Content-Type: application/json)", "body")
    detail = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg")} for e in errors]
    body = {"error": {"type": "invalid_request", "message": f"{field}: {first.get('msg')}", "field": field},
            "detail": detail}
    return JSONResponse(body, 422)
