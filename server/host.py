"""The engine contract: what the server asks of a loaded model (`Host`), and what each engine asks
beyond that (`BatchHost` for the builtin engine, `StepHost` for vLLM's). `server.app.load_engine`
loads the host `--engine` names and picks the engine class that runs it.

`Host` extends the VAR runtime's `RoutingBackend` (server/var_runtime.py) with what the routes and
`ServerState` read.
Test: `pytest tests/test_server_engine.py` (builtin), `tests/vllm_engine/test_vllm_server.py` (vLLM).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .var_runtime import RoutingBackend


@runtime_checkable
class Host(RoutingBackend, Protocol):
    tokenizer: Any
    model: Any  # routes read model.config.vocab_size and max_position_embeddings
    model_name: str
    num_experts: int
    top_k: int
    routed_available: bool  # return_routed_experts can be answered
    expert_load_on_engine: bool  # reading the expert-load counters must run on the engine thread
    expert_load_switchable: bool  # set_expert_load works (else the counting is fixed at start-up)
    can_capture: bool  # capture_start / capture_stop / capture_parquet work (else 409)
    capturing: bool
    capture_tokens: int
    capture_started: bool  # a capture was started since the server started (stats can be written)

    def start_expert_load(self) -> tuple[int, tuple[str, ...]] | None:
        """(experts per layer, tiers counted) of the expert-load counters; None: this model has none."""

    def expert_load_reading(self) -> Any:
        """The cumulative expert-load counters (var_moe.expert_load.Reading)."""

    def set_expert_load(self, on: bool) -> None:
        """Count expert load from the next forward, or stop counting (engine thread)."""

    def capture_start(self) -> None: ...

    def capture_stop(self) -> None: ...

    def capture_parquet(self, path: Path, var_enabled: bool) -> None: ...


@runtime_checkable
class BatchHost(Host, Protocol):
    """What the builtin engine (server/engine.py) asks of its host: per-row tier counts of each batch
    segment, and each forward's routed experts."""

    def begin_batch(self) -> None: ...

    def row_tier_counts(self, valid_tokens_B: list[int]) -> list[dict[str, int]]: ...

    def record_routing(self, on: bool) -> None: ...

    def last_routing(self) -> tuple[Any, Any]: ...


@runtime_checkable
class StepHost(Host, Protocol):
    """What vLLM's engine (server/vllm_engine.py) asks of its host: the LLMEngine it steps, each
    request's tier counts, and the workers' routed-experts rows."""

    llm: Any

    def request_tiers(self, var: bool, forwarded_ids: list[int], prev_id: int = -1) -> dict[str, int]: ...

    def take_routed(self, keys: list[str], finished: list[str]) -> dict[str, list]: ...

