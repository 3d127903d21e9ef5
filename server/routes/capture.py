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

router = APIRouter(prefix="/admin/capture", tags=["capture"], dependencies=[Depends(require_admin)])


@router.post("/start", response_model=CaptureStatus)
async def capture_start(state: ServerState = Depends(get_state)):
    await state.engine_call(state.host.capture_start)
    return {"capturing": True, "note": "statistics restart from zero at every start"}


@router.post("/stop", response_model=CaptureStatus)
async def capture_stop(state: ServerState = Depends(get_state)):
    await state.engine_call(state.host.capture_stop)
    return {"capturing": False, "tokens": state.host.capture_tokens,
            "note": "GET /admin/capture/stats downloads the statistics as Parquet"}


@router.get("/stats")
async def capture_stats(part: Literal["stats", "pairs"] = "stats", state: ServerState = Depends(get_state)):
    """The statistics file of `varmoe capture` (part=stats) or its pair sidecar (part=pairs)."""
    host = state.host
    if host.analyzer is None:
        raise APIError(409, "no_capture", "no capture has been started on this server")
    tmp = Path(tempfile.mkdtemp(prefix="varmoe-capture-")) / "routing_stats.parquet"
    await state.engine_call(lambda: host.capture_parquet(tmp, state.var.enabled))
    path = tmp if part == "stats" else tmp.with_name("routing_stats.pairs.parquet")
    cleanup = BackgroundTask(shutil.rmtree, tmp.parent, ignore_errors=True)
    if not path.exists():
        cleanup.func(*cleanup.args, **cleanup.kwargs)
        raise APIError(404, "not_found", f"this capture has no {part} file", "part")
    return FileResponse(path, media_type="application/vnd.apache.parquet", filename=path.name, background=cleanup)
