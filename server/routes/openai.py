"""OpenAI-compatible routes: `/v1/completions` (bodies built in server/openai_compat.py) and
`/v1/models` (the served model name, never a path, and its context length as `max_model_len`,
which lm-evaluation-harness's `max_length` must stay below). Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .. import openai_compat
from ..jobs import Job, RowSpec
from ..schemas import CompletionRequest, CompletionResponse, ModelList
from ..state import ServerState, get_state

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/completions", response_model=CompletionResponse, response_model_exclude_unset=True)
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    state.check_max_new(body.max_tokens, "max_tokens")
    mode = state.mode_for(body.var, request)
    stops = [s for s in ([body.stop] if isinstance(body.stop, str) else (body.stop or [])) if s]  # "" stops nothing

    def make_jobs() -> tuple[list[list[int]], list[Job]]:
        prompts = openai_compat.prompt_ids(state, body)
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
    return await state.in_worker(openai_compat.completion_body, state.host, body, prompts, results, stops,
                                 state.settings.model_label)


@router.get("/models", response_model=ModelList)
async def models(state: ServerState = Depends(get_state)):
    return {"object": "list", "data": [{"id": state.settings.model_label, "object": "model", "owned_by": "var-moe",
                                        "max_model_len": state.context_len}]}
