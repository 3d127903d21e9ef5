"""Phase 1 capture from live traffic (admin): start, stop, download the statistics as Parquet.

Hooks are attached and detached on the engine thread between batches. Test:
`pytest tests/test_server_api.py tests/test_remote_capture.py`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from ..errors import APIError
from ..schemas import CaptureStatus
from ..state import ServerState, get_state, require_admin


def capturing_state(state: ServerState = Depends(get_state)) -> ServerState:
    """The server's state, once its host can capture (vLLM's compiled model has no per-token hooks)."""
    if not state.host.can_capture:
        raise APIError(409, "capture_unavailable", "capture runs on the builtin engine (varmoe serve without "
                       "--engine vllm): it needs per-token router hooks that vLLM's compiled model does not offer")
    return state


router = APIRouter(prefix="/admin/capture", tags=["capture"], dependencies=[Depends(require_admin)])


@router.post("/start", response_model=CaptureStatus)
async def capture_start(state: ServerState = Depends(capturing_state)):
    await state.engine_call(state.host.capture_start)
    return {"capturing": True, "note": "statistics restart from zero at every start (a running capture's too)"}


@router.post("/stop", response_model=CaptureStatus)
async def capture_stop(state: ServerState = Depends(capturing_state)):
    await state.engine_call(state.host.capture_stop)
    return {"capturing": False, "tokens": state.host.capture_tokens,
            "note": "GET /admin/capture/stats downloads the statistics as Parquet"}


@router.get("/stats")
async def capture_stats(part: Literal["stats", "pairs"] = "stats", state: ServerState = Depends(capturing_state)):
    """The statistics file of `varmoe capture` (part=stats) or its pair sidecar (part=pairs)."""
    host = state.host
    if not host.capture_started:
        raise APIError(409, "no_capture", "no capture has been started on this server")
    folder = Path(tempfile.mkdtemp(prefix="varmoe-capture-"))
    tmp = folder / "routing_stats.parquet"
    try:  # the folder goes away on every path: written and sent, missing part, or failed write
        await state.engine_call(lambda: host.capture_parquet(tmp, state.var.enabled))
        path = tmp if part == "stats" else tmp.with_name("routing_stats.pairs.parquet")
        if not path.exists():
            raise APIError(404, "not_found", f"this capture has no {part} file", "part")
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, APIError):
            raise
        raise APIError(500, "capture_failed", f"writing the statistics failed: {type(exc).__name__}: {exc}") from exc
    return FileResponse(path, media_type="application/vnd.apache.parquet", filename=path.name,
                        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True))
