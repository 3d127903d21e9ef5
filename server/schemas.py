"""Request and response bodies of the HTTP API (pydantic), separate from routes and the engine.

Requests are strict (no "5" for 5, no 1 for true) and refuse unknown fields, so a typo such as
`max_new_token` is a 422 naming the field instead of a silently ignored setting. Limits that
depend on the loaded model (prompt length, context) are checked in state.py. Response models
document what each route returns in the OpenAPI schema. The OpenAI-compatible
completion body accepts the OpenAI fields a client may send with their neutral values.
Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**63 - 1
MAX_TEXTS = 64  # texts per perplexity / prompts per completion request


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateRequest(StrictBody):
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool = False
    var: bool | None = Field(None, description="pin VAR on/off for this request; null = current mode")
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=8)


class Timings(BaseModel):
    queue_s: float
    ttft_s: float | None
    total_s: float


class GenerateResponse(BaseModel):
    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    mode: Literal["var", "baseline"]
    timings: Timings
    routing: dict[str, int] = Field(description="tier -> routing decisions of this request (tokens x MoE layers)")


class PerplexityRequest(StrictBody):
    text: str | list[str] = Field(min_length=1)
    var: bool | None = None


class PerplexityItem(BaseModel):
    tokens: int  # predicted tokens (the first token of a text has no prediction)
    mean_nll: float  # nats per token
    perplexity: float


class PerplexityResponse(BaseModel):
    mode: Literal["var", "baseline"]
    results: list[PerplexityItem]
    overall: PerplexityItem


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(StrictBody):
    model: str | None = None
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: Literal[False] = False
    var: bool | None = None
    # OpenAI fields accepted only with their neutral values (nothing here implements them)
    best_of: Literal[1] | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    user: str | None = None
    suffix: None = None


class ToggleRequest(StrictBody):
    enabled: bool


class ToggleResponse(BaseModel):
    enabled: bool
    previous: bool
    applies: str


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: dict[str, Any] | None
    finish_reason: str


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    mode: Literal["var", "baseline"] | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VarStatusResponse(BaseModel):
    mode: Literal["var", "baseline"]
    var: dict[str, Any] = Field(description="availability, config (enable_var = mode), table sizes, demotions")
    decisions_since_start: dict[str, dict[str, dict[str, int]]] = Field(description="mode -> layer -> tier -> n")
    tier_shares_since_start: dict[str, dict[str, dict[str, float]]] = Field(description="mode -> layer -> tier -> share")
    batches_since_start: dict[str, int]
    verification_checks_since_start: dict[str, dict[str, int]]
    verification_agreement: dict[str, float | None]
    capturing: bool
    batches_run: int
    uptime_s: float


class CaptureStatus(BaseModel):
    capturing: bool
    tokens: int | None = None
    note: str


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
