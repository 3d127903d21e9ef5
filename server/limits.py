"""Request-body limits as a pure ASGI middleware: size and read time, enforced before any parsing.

FastAPI reads and parses the whole JSON body before a route (or a pydantic limit) sees it, so a
large body costs several times its size in memory before any 413. This middleware refuses such a
body from its `Content-Length` header without reading it, and counts the bytes of a body sent
without one (chunked) as they arrive, answering 413 as soon as the count passes `max_bytes`. It also
bounds the time the whole body may take to arrive (`timeout_s`): uvicorn has no such timeout, so a
half-sent body would hold its connection open forever.

When a limit trips mid-body the middleware answers itself and the application sees an
`http.disconnect`, so no route runs on a truncated body and nothing else is sent. Errors have the
API's JSON shape: 413 `body_too_large`, 408 `body_timeout`, 400 `bad_content_length`.
Test: `pytest tests/test_server_limits.py`.
"""

from __future__ import annotations

import asyncio
import time

from .errors import error_response


async def send_error(scope, send, status: int, type_: str, message: str) -> None:
    await error_response(status, type_, message, "body", headers={"connection": "close"})(scope, None, send)


class BodyLimit:
    """ASGI middleware: at most `max_bytes` of request body, arriving within `timeout_s`."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await send_error(scope, send, 400, "bad_content_length", "Content-Length must be a whole number")
            if int(length) > self.max_bytes:
                return await send_error(scope, send, 413, "body_too_large", self._too_large(int(length)))
        deadline = time.monotonic() + self.timeout_s
        state = {"received": 0, "body_done": False, "answered": False}

        async def limited_receive():
            if state["answered"]:
                return {"type": "http.disconnect"}
            if state["body_done"]:  # waiting for a disconnect after the body: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                state["answered"] = True
                await send_error(scope, send, 408, "body_timeout",
                                 f"the request body did not arrive within {self.timeout_s:g} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["answered"] = True
                    await send_error(scope, send, 413, "body_too_large", self._too_large(None))
                    return {"type": "http.disconnect"}
                state["body_done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message):
            if not state["answered"]:  # once the limit answered, the application's reply is dropped
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    def _too_large(self, length: int | None) -> str:
        size = f"{length} bytes" if length is not None else f"more than {self.max_bytes} bytes"
        return f"the request body has {size}; the limit is {self.max_bytes} (setting max_body_bytes)"
