"""VAR on vLLM: verified token and (previous, token) tables inside vLLM's MoE routers, through its extension points.

    from vllm import LLM
    from var_moe.vllm import engine_kwargs
    llm = LLM(**engine_kwargs("models/reference-moe", dtype="float32"))
    llm.collective_rpc("varmoe_load_tables", args=("models/reference-moe/var/var_tables.safetensors",))
    llm.collective_rpc("varmoe_set_enabled", args=(True,))

Modules: models.py (Var* classes, set up before compilation), routing.py (a step's decision), rows.py
(per-request modes), expert_load.py, tables.py (loading a tables file), extension.py (worker methods
for `collective_rpc`), agreement.py (the workers' counters). Needs the `vllm` extra (its own
environment: constraints-vllm.txt); importing this package without vLLM works, building an engine does not.
Test: `pytest tests/vllm_engine/` in the vLLM environment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .models import PREFIX, SUPPORTED, register

EXTENSION = "var_moe.vllm.extension.VarWorkerExtension"
# room for (previous, token) entries, all layers together, in an engine built by engine_kwargs: the
# buffers are fixed when the model is built (compiled graphs keep pointers to them); each entry costs
# 8 + 12 * top_k bytes per worker. A tables file with more is refused when loaded.
PAIR_CAPACITY = 65536


def model_architecture(model: str) -> str:
    """The architecture named in a local model folder's config.json."""
    cfg = Path(model) / "config.json"
    try:
        archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read the architecture of {model}: {exc}") from exc
    if len(archs) != 1:
        raise InvalidInputError(f"{cfg} must name exactly one architecture, got {archs}")
    return archs[0]


def engine_kwargs(model: str, pair_capacity: int | None = None, expert_load: bool = True,
                  **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` / `AsyncEngineArgs` that build `model` with VAR installed.

    The Var* architecture changes vLLM's config hash, and `additional_config` says so explicitly,
    so a VAR engine never loads a plain engine's compiled graph from the cache, nor the reverse.
    `pair_capacity`: how many (previous, token) entries, all layers together, the engine can serve
    (default PAIR_CAPACITY; 0 builds no pair tier). `expert_load`: count expert load in the compiled
    model (expert_load.py; off builds no counting into the graph, routed-experts rows are kept either
    way). Both are part of `additional_config`, hence of the compile-cache key.
    """
    register()
    # Per-request modes read each request's sampling parameters from vLLM's V1 model runner (rows.py);
    # the V2 runner (vLLM's default on GPUs with Triton) keeps none, so VAR engines ask for V1.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    arch = model_architecture(model)
    if arch not in SUPPORTED:
        raise InvalidInputError(f"VAR on vLLM supports the architectures {sorted(SUPPORTED)}; this model is {arch!r}")
    extra = dict(kwargs.pop("additional_config", None) or {})
    cap = PAIR_CAPACITY if pair_capacity is None else pair_capacity
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
        raise InvalidInputError(f"pair_capacity must be an integer >= 0 ((previous, token) entries), got {cap!r}")
    extra["varmoe"] = {"routing": "var-tables", "version": 2, "pair_capacity": cap, "expert_load": bool(expert_load)}
    overrides = dict(kwargs.pop("hf_overrides", None) or {})
    overrides["architectures"] = [PREFIX + arch]
    return {"model": model, "hf_overrides": overrides, "worker_extension_cls": EXTENSION,
            "additional_config": extra, **kwargs}
