"""`/v1/generate` (JSON or a server-sent-event stream) and `/v1/perplexity` (one text or a list).

Each request becomes engine jobs (server/jobs.py); the response carries timings and the
request's routing decisions by tier. Tokenizing and building bodies run on a worker thread
(`state.in_worker`), never on the event loop. Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..errors import APIError
from ..jobs import Job, JobResult, RowSpec, generated_text
from ..schemas import GenerateRequest, GenerateResponse, PerplexityRequest, PerplexityResponse
from ..state import ServerState, get_state
from ..var_runtime import TIERS

router = APIRouter(prefix="/v1", tags=["generation"])


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_unset=True,
             description="Generated text, timings and routing tiers; with `stream: true` a text/event-stream "
                         "of `token` events and a final `done` event holding this body.")
async def generate(body: GenerateRequest, request: Request, state: ServerState = Depends(get_state)):
    state.check_max_new(body.max_new_tokens, "max_new_tokens")
    mode = state.mode_for(body.var, request)
    ids = await state.in_worker(state.tokenize, body.prompt, "prompt", body.max_new_tokens)
    if body.return_routed_experts:
        state.check_routed_size([(len(ids), body.max_new_tokens)])
    spec = RowSpec(ids, body.max_new_tokens, body.temperature, body.top_p, body.seed)
    job = Job(spec, pinned_mode=mode, stop=body.stop or [], stream=body.stream, routed=body.return_routed_experts)
    if body.stream:
        return stream_generate(state, job)
    (result,) = await state.run(request, [job], "/v1/generate")
    return await state.in_worker(generate_body, state, result, job)


@router.post("/perplexity", response_model=PerplexityResponse)
async def perplexity(body: PerplexityRequest, request: Request, state: ServerState = Depends(get_state)):
    texts = [body.text] if isinstance(body.text, str) else body.text  # at most MAX_TEXTS (schemas.py)
    mode = state.mode_for(body.var, request)

    def make_jobs() -> list[Job]:
        jobs = []
        for i, text in enumerate(texts):
            field = "text" if isinstance(body.text, str) else f"text[{i}]"
            ids = state.tokenize(text, field)
            if len(ids) < 2:
                raise APIError(422, "invalid_request", "a text needs at least 2 tokens to have a perplexity", field)
            jobs.append(Job(RowSpec(ids, 0, prompt_logprobs=True), pinned_mode=mode))
        return jobs

    jobs = await state.in_worker(make_jobs)
    results = await state.run(request, jobs, "/v1/perplexity")
    # (NLL, predicted tokens) per text: the first token of a text has no prediction
    lps = [r.state.prompt_logprobs[1:] for r in results]
    nll_n = [(-float(sum(lp)), len(lp)) for lp in lps]
    overall = ppl_item(sum(nll for nll, _ in nll_n), sum(n for _, n in nll_n))
    return {"mode": results[0].mode, "results": [ppl_item(nll, n) for nll, n in nll_n], "overall": overall}


def ppl_item(nll: float, n: int) -> dict[str, float]:
    mean = nll / max(1, n)
    return {"tokens": n, "mean_nll": mean, "perplexity": math.exp(min(mean, 700.0))}


def generate_body(state: ServerState, result: JobResult, job: Job) -> dict[str, Any]:
    return (result.routed or {}) | {
        "text": generated_text(state.host.tokenizer, result.state, job.stop),
        "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.state.new_ids),
        "finish_reason": result.state.finish_reason or "length", "mode": result.mode,
        "timings": {"queue_s": result.queue_s, "ttft_s": result.ttft_s, "total_s": result.total_s},
        # routing decisions of this request (valid tokens x MoE layers), by tier
        "routing": {t: int(result.tier_counts.get(t, 0)) for t in TIERS},
    }


def stream_generate(state: ServerState, job: Job) -> StreamingResponse:
    """Server-sent events: one `token` event per new token, then `done` with the full body."""
    state.submit([job])  # errors (429/503) happen before the stream starts
    tok = state.host.tokenizer
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
                    routed = event[3] or {}  # this step's routed-experts rows
                    yield sse({"type": "token", "token_id": event[1], "text": delta, "logprob": event[2], **routed})
                    continue
                result = event[1]
                if result is None or result.error:
                    msg = "cancelled or timed out" if result is None else result.error
                    yield sse({"type": "error", "error": {"type": "engine_error", "message": msg}})
                else:
                    state.observe("/v1/generate", result.mode, t0)
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
