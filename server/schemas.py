"""Request and response bodies of the HTTP API (pydantic), separate from routes and the engine.

Requests are strict (no "5" for 5, no 1 for true) and refuse unknown fields, so a typo such as
`max_new_token` is a 422 naming the field instead of a silently ignored setting. Sizes are
bounded whatever the model (characters and token ids per prompt: 413 `prompt_too_long`; prompts
per request, stop strings and their length: 422), so a body inside the body-size limit
(server/limits.py) cannot ask for unbounded validation, tokenizing or stop-string matching. Limits
that depend on the loaded model (prompt tokens, context, vocabulary) are checked in state.py after
tokenizing. Response models document what each route returns in the OpenAPI schema.
Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

SEED_MAX = 2**63 - 1
MAX_TEXTS = 64  # texts per perplexity / prompts per completion request (the setting max_request_prompts is lower)
MAX_PROMPT_CHARS = 262_144
MAX_TOKEN_IDS = 32_768  # token ids in one prompt
MAX_STOPS = 8
MAX_STOP_CHARS = 256
TOKEN_ID_MAX = 2**31 - 1


ROUTED_HELP = ("also return the experts every token was routed to: prompt_routed_experts and routed_experts, "
               "[tokens][MoE layers][k] expert ids (vLLM's layout); routed_experts has a row per generated token "
               "the model read back (all but the last); streams carry each step's rows in its token event")
Routing = list[list[list[int]]]
Tiers = list[list[Literal["fast", "learned"]]]

Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def check_sizes(value, info: ValidationInfo):
    """Size limits of a prompt / text field with one clear message (a union's own errors name every
    branch it tried, e.g. "Input should be a valid string" for a too-long id list)."""
    what = info.field_name
    if isinstance(value, list) and value and all(isinstance(x, int) for x in value):
        items = [value]  # one prompt of token ids
    elif isinstance(value, list):
        if len(value) > MAX_TEXTS:
            raise ValueError(f"at most {MAX_TEXTS} {what}s per request (got {len(value)})")
        items = value
    else:
        items = [value]
    for x in items:
        # type "prompt_too_long": answered 413 like a prompt over the model's token limit
        if isinstance(x, str) and len(x) > MAX_PROMPT_CHARS:
            raise PydanticCustomError("prompt_too_long", f"a {what} may have at most {MAX_PROMPT_CHARS} characters "
                                      f"(got {len(x)})")
        if isinstance(x, list) and len(x) > MAX_TOKEN_IDS:
            raise PydanticCustomError("prompt_too_long", f"a {what} may have at most {MAX_TOKEN_IDS} token ids "
                                      f"(got {len(x)})")
    return value


def check_stops(value):
    stops = [value] if isinstance(value, str) else value
    if isinstance(stops, list):
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings (got {len(stops)})")
        if any(isinstance(x, str) and len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
    return value


class GenerateRequest(StrictBody):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool = False
    var: bool | None = Field(None, description="pin VAR on/off for this request; null = current mode")
    stop: list[Stop] | None = Field(None, max_length=MAX_STOPS)
    return_routed_experts: bool = Field(False, description=ROUTED_HELP)

    _sizes = field_validator("prompt", mode="before")(check_sizes)
    _stops = field_validator("stop", mode="before")(check_stops)


class Timings(BaseModel):
    queue_s: float
    ttft_s: float | None
    total_s: float


class RoutedFields(BaseModel):
    """What a generation answer carries with return_routed_experts."""

    prompt_routed_experts: Routing | None = Field(None, description="with return_routed_experts: [prompt tokens][MoE "
                                                                    "layers][k] expert ids")
    routed_experts: Routing | None = Field(None, description="with return_routed_experts: [generated tokens read "
                                                             "back][MoE layers][k] expert ids")
    prompt_routed_tiers: Tiers | None = Field(None, description="with return_routed_experts, in VAR mode: each row's "
                                                                "tier, fast (a VAR table) or learned")
    routed_tiers: Tiers | None = None


class GenerateResponse(RoutedFields):
    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    mode: Literal["var", "baseline"]
    timings: Timings
    routing: dict[str, int] = Field(description="tier -> routing decisions of this request (tokens x MoE layers)")


class PerplexityRequest(StrictBody):
    text: Annotated[Text, Field(min_length=1)] | Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS)]
    var: bool | None = None

    _sizes = field_validator("text", mode="before")(check_sizes)


class PerplexityItem(BaseModel):
    tokens: int  # predicted tokens (the first token of a text has no prediction)
    mean_nll: float  # nats per token
    perplexity: float


class PerplexityResponse(BaseModel):
    mode: Literal["var", "baseline"]
    results: list[PerplexityItem]
    overall: PerplexityItem


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]], Field(max_length=MAX_TOKEN_IDS)]


class CompletionRequest(StrictBody):
    model: str | None = Field(None, max_length=256)
    prompt: Text | Annotated[list[Text], Field(max_length=MAX_TEXTS)] | TokenIds | Annotated[list[TokenIds], Field(max_length=MAX_TEXTS)]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stop: Annotated[str, Field(max_length=MAX_STOP_CHARS)] | Annotated[
        list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: Literal[False] = False
    var: bool | None = None
    return_routed_experts: bool = Field(False, description=ROUTED_HELP)
    # OpenAI fields accepted only with their neutral values (nothing here implements them)
    best_of: Literal[1] | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    user: str | None = Field(None, max_length=256)
    suffix: None = None

    _sizes = field_validator("prompt", mode="before")(check_sizes)
    _stops = field_validator("stop", mode="before")(check_stops)


class ToggleRequest(StrictBody):
    enabled: bool


class ToggleResponse(BaseModel):
    enabled: bool
    previous: bool
    applies: str


class CompletionChoice(RoutedFields):
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
    max_model_len: int = Field(description="context length: prompt + new tokens (lm-eval's max_length stays below)")


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
