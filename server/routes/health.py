"""Liveness (`/healthz`), readiness (`/readyz`: the engine thread runs) and `/metrics`.

Test: `pytest tests/test_server_api.py tests/test_server_metrics.py`.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ..errors import error_response
from ..state import ServerState, get_state

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: ServerState = Depends(get_state)):
    if not state.engine.running:
        return error_response(503, "not_ready", "the engine is not running", headers={"Retry-After": "5"})
    return {"status": "ready", "model": state.settings.model_label, "var_available": state.host.available}


@router.get("/metrics")
async def metrics(state: ServerState = Depends(get_state)):
    state.metrics.queue_depth.set(state.engine.queue_depth)
    await state.refresh_expert_load()
    return Response(state.metrics.exposition(), media_type=state.metrics.content_type)
