"""VAR on vLLM: verified token tables inside vLLM's MoE routers, through vLLM's extension points.

    from vllm import LLM
    from var_moe.vllm import engine_kwargs
    llm = LLM(**engine_kwargs("models/reference-moe", dtype="float32"))
    llm.collective_rpc("varmoe_load_tables", args=("models/reference-moe/var/var_tables.safetensors",))
    llm.collective_rpc("varmoe_set_enabled", args=(True,))

Modules: routing.py (what a step computes), rows.py (per-request modes: which rows run VAR), models.py (Var* model classes, installed at build
time, before compilation), tables.py (tables file + fingerprint check), extension.py (worker
methods for `collective_rpc`). Needs the `vllm` extra (its own environment: see constraints-vllm.txt);
importing this package without vLLM works, building an engine does not.
Test: `pytest tests/vllm_engine/` in the vLLM environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXTENSION = "var_moe.vllm.extension.VarWorkerExtension"


def model_architecture(model: str) -> str:
    """The architecture named in a local model folder's config.json."""
    from ..errors import InvalidInputError

    cfg = Path(model) / "config.json"
    try:
        archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read the architecture of {model}: {exc}") from exc
    if len(archs) != 1:
        raise InvalidInputError(f"{cfg} must name exactly one architecture, got {archs}")
    return archs[0]


def engine_kwargs(model: str, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` / `AsyncEngineArgs` that build `model` with VAR installed.

    The Var* architecture changes vLLM's config hash, and `additional_config` says so explicitly,
    so a VAR engine never loads a plain engine's compiled graph from the cache, nor the reverse.
    """
    import os

    from .models import register, var_arch

    register()
    # Per-request modes read each request's sampling parameters from vLLM's V1 model runner (rows.py);
    # the V2 runner (vLLM's default on GPUs with Triton) keeps none, so VAR engines ask for V1.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    arch = var_arch(model_architecture(model))
    extra = dict(kwargs.pop("additional_config", None) or {})
    extra["varmoe"] = {"routing": "var-tables", "version": 1}
    overrides = dict(kwargs.pop("hf_overrides", None) or {})
    overrides["architectures"] = [arch]
    return {"model": model, "hf_overrides": overrides, "worker_extension_cls": EXTENSION,
            "additional_config": extra, **kwargs}
