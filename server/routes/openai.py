"""OpenAI-compatible routes: `/v1/completions` (bodies built in server/openai_compat.py) and
`/v1/models`. Test: `pytest tests/test_server_api.py tests/test_openai_client.py`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from .. import openai_compat
from ..decode import RowSpec
from ..engine import Job
from ..schemas import CompletionRequest, CompletionResponse, ModelList
from ..state import ServerState, get_state

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    prompts = openai_compat.prompt_ids(state, body)
    state.check_max_new(body.max_tokens, "max_tokens")
    mode = state.mode_for(body.var)
    stops = [s for s in ([body.stop] if isinstance(body.stop, str) else (body.stop or [])) if s]  # "" stops nothing
    jobs = []
    for i, ids in enumerate(prompts):
        state.check_prompt(ids, "prompt" if len(prompts) == 1 else f"prompt[{i}]", body.max_tokens, "max_tokens")
        spec = RowSpec(ids, body.max_tokens, body.temperature, body.top_p, body.seed,
                       prompt_logprobs=body.echo and body.logprobs is not None, top_logprobs=body.logprobs or 0)
        jobs.append(Job(spec, pinned_mode=mode, stop=stops))
    t0 = time.perf_counter()
    results = await state.run(request, jobs)
    state.observe("/v1/completions", results[0].mode, t0)
    return openai_compat.completion_body(state.host, body, prompts, results, stops)


@router.get("/models", response_model=ModelList)
async def models(state: ServerState = Depends(get_state)):
    return {"object": "list", "data": [{"id": state.host.model_name, "object": "model", "owned_by": "var-moe"}]}
