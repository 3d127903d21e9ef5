"""Run-time control: `/var/toggle` (admin; lands between batches), `/var/status` (what VarRuntime
says), and `/admin/expert-load` (admin; pauses or resumes the expert-load counting from the next step).

Test: `pytest tests/test_server_api.py tests/test_server_expert_load.py`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from ..errors import APIError
from ..schemas import ErrorResponse, ToggleRequest, ToggleResponse, VarStatusResponse
from ..state import ServerState, get_state, require_admin
from ..var_runtime import VarUnavailable

router = APIRouter(prefix="/var", tags=["var"])
admin_router = APIRouter(prefix="/admin", tags=["metrics"], dependencies=[Depends(require_admin)])
ADMIN_ERRORS = {401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}}


@router.post("/toggle", response_model=ToggleResponse, dependencies=[Depends(require_admin)], responses=ADMIN_ERRORS)
async def toggle(body: ToggleRequest, state: ServerState = Depends(get_state)):
    try:
        previous = state.var.set_enabled(body.enabled)
    except VarUnavailable as exc:
        raise APIError(409, "var_unavailable", str(exc), "enabled") from None
    return {"enabled": body.enabled, "previous": previous, "applies": "from the next batch"}


@router.get("/status", response_model=VarStatusResponse)
async def var_status(state: ServerState = Depends(get_state)):
    return {**state.var.status(), "capturing": state.host.capturing, "batches_run": state.engine.batches_run,
            "uptime_s": time.time() - state.started_at}


@admin_router.post("/expert-load", response_model=ToggleResponse, responses=ADMIN_ERRORS)
async def expert_load(body: ToggleRequest, state: ServerState = Depends(get_state)):
    previous = await state.switch_expert_load(body.enabled)
    return {"enabled": body.enabled, "previous": previous, "applies": "from the next step"}
