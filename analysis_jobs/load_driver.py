"""A small closed-loop HTTP load generator (asyncio + httpx) for the reliability checks.

`drive(url, clients, duration_s, body_fn, ...)`: `clients` coroutines each send a request, wait
for its answer, and send the next, until `duration_s` has passed or `max_requests` were sent in
all (both bounds always apply). Every request becomes one `Outcome` row: status (0 = connection
error, -1 = client-side timeout, -2 = stream broken after the first event), latency, generated
tokens, Retry-After, and whether a stream ended cleanly. Streams are read event by event; with
`disconnect_after` a client drops the connection after that many events (the fault check).
Unlike Locust this runs inside the calling process, so checks can interleave faults (toggles,
SIGTERM) precisely. Test: `pytest tests/test_reliability_checks.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Callable

import httpx

CONN_ERROR, CLIENT_TIMEOUT, STREAM_BROKEN = 0, -1, -2


@dataclass
class Outcome:
    t: float  # completion time (monotonic)
    endpoint: str
    status: int
    latency_s: float
    generated_tokens: int = 0
    retry_after: str | None = None
    stream_events: int = 0
    stream_clean: bool | None = None  # streams: ended with `done` + [DONE] (or a JSON error event)
    error: str | None = None
    mode: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(rows: list[Outcome]) -> dict:
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    ok = [r for r in rows if r.status == 200]
    return {"requests": len(rows), "by_status": dict(sorted(by_status.items())),
            "status_5xx": sum(1 for r in rows if r.status >= 500),
            "status_429": by_status.get("429", 0),
            "status_429_with_retry_after": sum(1 for r in rows if r.status == 429 and r.retry_after),
            "connection_errors": by_status.get(str(CONN_ERROR), 0),
            "client_timeouts": by_status.get(str(CLIENT_TIMEOUT), 0),
            "broken_streams": sum(1 for r in rows if r.status == STREAM_BROKEN or r.stream_clean is False),
            "generated_tokens": sum(r.generated_tokens for r in ok)}


async def _one(client: httpx.AsyncClient, endpoint: str, body: dict, timeout_s: float,
               disconnect_after: int | None) -> Outcome:
    t0 = time.monotonic()
    stream = bool(body.get("stream"))
    try:
        if not stream:
            r = await client.post(endpoint, json=body, timeout=timeout_s)
            data = _json(r)
            return Outcome(time.monotonic(), endpoint, r.status_code, time.monotonic() - t0,
                           int(data.get("generated_tokens") or (data.get("usage") or {}).get("completion_tokens") or 0),
                           r.headers.get("Retry-After"), mode=data.get("mode"))
        async with client.stream("POST", endpoint, json=body, timeout=timeout_s) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(time.monotonic(), endpoint, r.status_code, time.monotonic() - t0,
                               retry_after=r.headers.get("Retry-After"))
            n, clean, tokens, mode = 0, False, 0, None
            try:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        clean = True
                        break
                    event = json.loads(payload)
                    n += 1
                    if event.get("type") == "done":
                        tokens, mode = int(event.get("generated_tokens") or 0), event.get("mode")
                    elif event.get("type") == "error":
                        clean = True  # a JSON error event is a clean end (timeout, shutdown)
                    if disconnect_after is not None and n >= disconnect_after:
                        return Outcome(time.monotonic(), endpoint, 200, time.monotonic() - t0, 0,
                                       stream_events=n, stream_clean=None, error="client disconnected on purpose")
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                return Outcome(time.monotonic(), endpoint, STREAM_BROKEN, time.monotonic() - t0,
                               stream_events=n, stream_clean=False, error=type(exc).__name__)
            return Outcome(time.monotonic(), endpoint, 200, time.monotonic() - t0, tokens, stream_events=n,
                           stream_clean=clean, mode=mode)
    except httpx.TimeoutException as exc:
        return Outcome(time.monotonic(), endpoint, CLIENT_TIMEOUT, time.monotonic() - t0, error=type(exc).__name__)
    except httpx.HTTPError as exc:
        return Outcome(time.monotonic(), endpoint, CONN_ERROR, time.monotonic() - t0, error=type(exc).__name__)


def _json(r: httpx.Response) -> dict:
    try:
        data = r.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def drive_async(url: str, clients: int, duration_s: float, body_fn: Callable[[int, int], tuple[str, dict]],
                      max_requests: int = 100_000, timeout_s: float = 60.0, disconnect_after: int | None = None,
                      pause_s: float = 0.0) -> list[Outcome]:
    """`body_fn(client_index, request_index) -> (endpoint, json body)`; see the module docstring."""
    if clients < 1 or duration_s <= 0:
        raise ValueError("clients must be >= 1 and duration_s > 0")
    rows: list[Outcome] = []
    deadline = time.monotonic() + duration_s
    budget = {"left": max_requests}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        i = 0
        while time.monotonic() < deadline and budget["left"] > 0:
            budget["left"] -= 1
            endpoint, body = body_fn(c, i)
            rows.append(await _one(client, endpoint, body, timeout_s, disconnect_after))
            i += 1
            if rows[-1].status == 429:  # honour Retry-After (capped) like a well-behaved client
                await asyncio.sleep(min(float(rows[-1].retry_after or 1), 2.0) * 0.25)
            elif rows[-1].status == CONN_ERROR:  # server gone or refusing: back off, do not spin
                await asyncio.sleep(0.5)
            elif pause_s:
                await asyncio.sleep(pause_s)

    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
    return rows


def drive(url: str, clients: int, duration_s: float, body_fn, **kw) -> list[Outcome]:
    return asyncio.run(drive_async(url, clients, duration_s, body_fn, **kw))
