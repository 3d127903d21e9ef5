"""The jobs both engines run: `RowSpec` (one prompt's decoding settings), `RowState` (what was
produced for it so far), `Job` (a row's request-side state: mode, stop strings, deadline, events
posted back to the request's event loop) and `JobResult` (its "done" event).

Test: `pytest tests/test_server_engine.py`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RowSpec:
    """One request's share of a batch."""

    prompt_ids: list[int]
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    prompt_logprobs: bool = False  # log p(prompt[i] | prompt[:i]) for i >= 1
    top_logprobs: int = 0  # also the N most likely tokens at every reported position
    # the generated tokens' own log-probs are reported (an engine that computes them apart, like
    # vLLM, skips that work when the response does not show them)
    sampled_logprobs: bool = True


@dataclass
class RowState:
    """What the decoder produced for one row so far."""

    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[float] = field(default_factory=list)
    new_top: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # length | stop | eos | cancelled | timeout
    forwarded_tokens: int = 0  # valid tokens this row sent through the model


@dataclass
class JobResult:
    state: RowState
    mode: str
    prompt_tokens: int
    queue_s: float
    ttft_s: float | None
    total_s: float
    tier_counts: dict[str, int]  # routing decisions of this request by tier (all layers)
    error: str | None = None
    # with return_routed_experts: {"prompt_routed_experts": [tokens][layers][k], "routed_experts": ...}
    routed: dict[str, list] | None = None


ROW_TIERS = ("learned", "fast")  # index: served by a VAR table


def generated_text(tokenizer: Any, state: RowState, stops: list[str]) -> str:
    """The row's new text; a row that a stop string ended stops before the first one in it."""
    text = tokenizer.decode(state.new_ids, skip_special_tokens=True)
    if state.finish_reason != "stop":
        return text
    return text[:min((text.find(s) for s in stops if s in text), default=len(text))]


@dataclass
class Job:
    spec: RowSpec
    pinned_mode: str | None = None  # "var" | "baseline" | None (current mode)
    mode: str = ""  # the mode it runs in, set when an engine fixes it (vLLM: on arrival; builtin: its batch's)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    timeout_s: float = 120.0
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False  # set by the HTTP side; read by the engine thread between steps
    enqueued_at: float = 0.0
    first_token_at: float | None = None
    request: int = 0  # jobs submitted together share it (fair scheduling is per request)
    started_at: float | None = None  # when its row entered a batch
    tier_counts: dict[str, int] = field(default_factory=dict)  # summed over segments
    segment_tokens: int = 0  # forwarded tokens already counted in tier_counts
    posted: bool = False  # its "done" event has been sent
    routed: bool = False  # return_routed_experts: keep the experts of every token it sends through
    prompt_routing: list | None = None  # [prompt tokens][MoE layers][k]
    gen_routing: list = field(default_factory=list)  # [generated tokens fed back][MoE layers][k]
    prompt_tiers: list | None = None  # [prompt tokens][MoE layers] "fast" | "learned", VAR mode only
    gen_tiers: list = field(default_factory=list)

    def add_routing(self, experts: list, fast: list[list[bool]] | None, prompt: bool) -> dict[str, list]:
        """File rows of routed experts (and, in VAR mode, whether a table served each layer's choice) as
        the prompt's or as generated tokens fed back; returns them as a stream's token-event fields."""
        tiers = None if fast is None else [[ROW_TIERS[f] for f in row] for row in fast]
        if prompt:
            self.prompt_routing, self.prompt_tiers = experts, tiers
        else:
            self.gen_routing += experts
            self.gen_tiers += tiers or []
        prefix = "prompt_routed_" if prompt else "routed_"
        return {prefix + "experts": experts} | ({} if tiers is None else {prefix + "tiers": tiers})

    def result(self, state: RowState, now: float, tiers: dict[str, int] | None = None,
               error: str | None = None) -> JobResult:
        """The job's "done" event, timed from its stamps."""
        ttft = None if self.first_token_at is None else self.first_token_at - self.enqueued_at
        routed = None
        if self.routed:
            routed = {"prompt_routed_experts": self.prompt_routing or [], "routed_experts": list(self.gen_routing)}
            if self.prompt_tiers is not None:
                routed |= {"prompt_routed_tiers": self.prompt_tiers, "routed_tiers": list(self.gen_tiers)}
        return JobResult(state, self.mode, len(self.spec.prompt_ids), (self.started_at or now) - self.enqueued_at,
                         ttft, now - self.enqueued_at, dict(tiers or {}), error, routed)

    def stop_reason(self, now: float) -> str | None:
        """"cancelled" or "timeout" when the job must stop now, else None."""
        if self.cancelled:
            return "cancelled"
        return "timeout" if now > self.enqueued_at + self.timeout_s else None

    def finish(self, result: JobResult | None) -> None:
        """Post the "done" event (None: cancelled, nobody waits for a body)."""
        self.posted = True
        self.post("done", result)

    def post(self, *event: Any) -> None:
        """Hand an event to the request's event loop (thread-safe; a closed loop is ignored)."""
        if self.loop is None or self.events is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # loop closed: the client is gone
            self.cancelled = True
