"""The application factory; nothing else lives here. `create_app(settings)` loads the model and picks
its engine (`load_engine`), builds the shared `ServerState` (server/state.py: VAR runtime, engine,
metrics), wires the routers of server/routes/ (one per concern; the table of endpoints:
docs/SERVER.md), the JSON error handlers (server/errors.py), the body limits (size and read time,
server/limits.py) and request counting, and starts the engine thread on start-up and drains it on
shutdown. Run: `varmoe serve`. Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI

from .errors import install_error_handlers
from .host import Host
from .limits import BodyLimit
from .metrics import ServerMetrics
from .routes import ROUTERS
from .settings import ServerSettings
from .state import ServerState


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


def load_engine(settings: ServerSettings) -> tuple[Host, type]:
    """The host of `settings.engine` and the engine class that runs it (vLLM: its own environment)."""
    if settings.engine == "vllm":
        from .vllm_engine import VllmEngine
        from .vllm_host import VllmHost

        return VllmHost.load(settings), VllmEngine
    from .engine import Engine
    from .model_host import ModelHost

    return ModelHost.load(settings), Engine


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = ServerState(settings, *load_engine(settings))

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
    for router in ROUTERS:
        app.include_router(router)
    # from the routers themselves: included routers are resolved lazily, app.routes lacks their paths
    known = {r.path for router in ROUTERS for r in router.routes}
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestCounter, metrics=state.metrics, known_paths=known)  # outermost: counts 413/408 too
    return app
