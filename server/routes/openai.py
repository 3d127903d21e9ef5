"""OpenAI-compatible routes: `/v1/completions` (prompt forms in, `text_completion` objects out) and
`/v1/models` (the served model name, never a path, and its context length as `max_model_len`,
which lm-evaluation-harness's `max_length` must stay below).

Accepted prompts: a string, a list of strings, a list of token ids, or a list of token-id lists
(lm-evaluation-harness's `local-completions` sends token ids by default). With `echo: true` the
returned text and log-probabilities cover the prompt too: `token_logprobs[0]` is null (the first
token has no prediction) and `top_logprobs[i]` maps the `logprobs` most likely tokens to their
log-probabilities. That is what `local-completions` needs for loglikelihood requests
(`max_tokens` 0 or 1, `echo`, `logprobs: 1`). Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request

from ..errors import APIError
from ..jobs import Job, JobResult, RowSpec, generated_text
from ..schemas import CompletionRequest, CompletionResponse, ModelList
from ..state import ServerState, get_state

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/completions", response_model=CompletionResponse, response_model_exclude_unset=True)
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    state.check_max_new(body.max_tokens, "max_tokens")
    mode = state.mode_for(body.var, request)
    stops = [s for s in ([body.stop] if isinstance(body.stop, str) else (body.stop or [])) if s]  # "" stops nothing

    def make_jobs() -> tuple[list[list[int]], list[Job]]:
        prompts = prompt_ids(state, body)
        jobs = []
        for i, ids in enumerate(prompts):
            state.check_prompt(ids, "prompt" if len(prompts) == 1 else f"prompt[{i}]", body.max_tokens, "max_tokens")
            spec = RowSpec(ids, body.max_tokens, body.temperature, body.top_p, body.seed,
                           prompt_logprobs=body.echo and body.logprobs is not None, top_logprobs=body.logprobs or 0,
                           sampled_logprobs=body.logprobs is not None)
            jobs.append(Job(spec, pinned_mode=mode, stop=stops, routed=body.return_routed_experts))
        if body.return_routed_experts:
            state.check_routed_size([(len(ids), body.max_tokens) for ids in prompts])
        return prompts, jobs

    # tokenizing, and decoding every token for echo / logprobs, are seconds of CPU for a big
    # request: on a worker thread, so that /healthz and streams keep their answers coming
    prompts, jobs = await state.in_worker(make_jobs)
    results = await state.run(request, jobs, "/v1/completions")
    return await state.in_worker(completion_body, state, body, prompts, results, stops)


@router.get("/models", response_model=ModelList)
async def models(state: ServerState = Depends(get_state)):
    return {"object": "list", "data": [{"id": state.settings.model_label, "object": "model", "owned_by": "var-moe",
                                        "max_model_len": state.context_len}]}


def prompt_ids(state: ServerState, body: CompletionRequest) -> list[list[int]]:
    """Token ids of every prompt; raises APIError naming the field."""
    p = body.prompt
    if isinstance(p, str):
        return [state.tokenize(p, "prompt")]
    if not p:
        raise APIError(422, "invalid_request", "prompt must not be empty", "prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return [state.tokenize(item, f"prompt[{i}]") if isinstance(item, str) else list(item) for i, item in enumerate(p)]


def _top_dicts(tokenizer, tops) -> list[dict[str, float] | None]:
    out: list[dict[str, float] | None] = []
    for pairs in tops:  # None: a position without a prediction (the prompt's first token)
        out.append(None if pairs is None else {})
        for tok_id, lp in pairs or ():
            out[-1].setdefault(tokenizer.decode([tok_id]), lp)  # two ids may decode alike: keep the likelier
    return out


def _choice(tok, body: CompletionRequest, ids: list[int], result, index: int, stops: list[str]) -> dict[str, Any]:
    st = result.state
    gen_ids = list(st.new_ids)
    reason = {"eos": "stop", "stop": "stop"}.get(st.finish_reason or "length", "length")
    gen_text = generated_text(tok, st, stops)
    prompt_text = tok.decode(ids) if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        n = body.logprobs
        tokens, token_lps, tops = [], [], []
        if body.echo:
            tokens += [tok.decode([i]) for i in ids]
            token_lps += list(st.prompt_logprobs) or [None] * len(ids)
            tops += _top_dicts(tok, st.prompt_top) if n else [{} for _ in ids]
        tokens += [tok.decode([i]) for i in gen_ids]
        token_lps += list(st.new_logprobs)
        tops += _top_dicts(tok, st.new_top) if n else [{} for _ in gen_ids]
        offsets = list(itertools.accumulate(map(len, tokens), initial=0))[:-1]  # where each token's text starts
        logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
    return {"text": prompt_text + gen_text, "index": index, "logprobs": logprobs, "finish_reason": reason,
            **(result.routed or {})}


def completion_body(state: ServerState, body: CompletionRequest, prompts: list[list[int]], results: list[JobResult],
                    stops: list[str]) -> dict[str, Any]:
    tok = state.host.tokenizer
    choices = [_choice(tok, body, ids, r, i, stops) for i, (ids, r) in enumerate(zip(prompts, results))]
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(r.state.new_ids) for r in results)
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model or state.settings.model_label,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "mode": results[0].mode if results else None,
    }
