"""Var* model classes: each supported vLLM MoE model, subclassed to install VAR when it is built.

vLLM builds the model object, loads its weights, then compiles it (CPU: inductor; GPU: also CUDA
graphs); a router patched after that is ignored. So VAR is installed in `__init__` of a subclass
(`VarMixtralForCausalLM`, ...) that `engine_kwargs` names in `hf_overrides["architectures"]`: vLLM's
own model code runs, routing.py `install_var` patches it, and the tables start empty with VAR off
(the worker extension, extension.py, fills and switches them).

`register()` adds the classes to vLLM's `ModelRegistry`, in every vLLM process through this
package's `vllm.general_plugins` entry point (pyproject.toml) and in `engine_kwargs()` for the
in-process engine. It only adds architecture names: an engine that asks for no Var* architecture is
untouched. Test: `pytest tests/vllm_engine/`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

# vLLM architecture (its class's name) -> its module under vllm.model_executor.models. Mixtral is tested
# on the reference model; the others build the same way (router linear + FusedMoE runner + token
# embedding; GPT-OSS names them `router` and `embedding`).
SUPPORTED = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "GptOssForCausalLM": "gpt_oss",
    "DeepseekV3ForCausalLM": "deepseek_v2",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "GraniteMoeForCausalLM": "granitemoe",
}
PREFIX = "Var"


@functools.cache
def var_class(arch: str) -> type:
    """The Var subclass of vLLM's class for `arch` (built once)."""
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{SUPPORTED[arch]}"), arch)

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        from ..adapters import get_adapter
        from .expert_load import install_load
        from .routing import install_var

        hf = vllm_config.model_config.hf_config
        top_k = int(hf.num_experts_per_tok)
        sched = vllm_config.scheduler_config
        # every forward carries at most max_num_batched_tokens tokens (the runner's own buffers
        # have that size); dummy runs at start-up stay within it too
        max_tokens = max(int(sched.max_num_batched_tokens), int(vllm_config.model_config.max_model_len))
        extra = vllm_config.additional_config
        varmoe = (extra.get("varmoe") or {}) if isinstance(extra, dict) else {}
        # where the family's router sits and how it scales its top-k weights: read from its adapter
        adapter = get_adapter(hf)
        state = install_var(self, int(hf.vocab_size), top_k, max_tokens, int(varmoe.get("pair_capacity", 0)),
                            adapter.weight_scale, adapter.router_attr)
        state.model_dir = str(vllm_config.model_config.model)
        experts = next(iter(state.layers.values())).num_experts
        install_load(state, experts, top_k, bool(varmoe.get("expert_load", True)))  # expert load + routed experts

    def load_weights(self, weights: Any) -> Any:
        loaded = base.load_weights(self, weights)
        # Fingerprint the gates now: after loading, vLLM may repack or drop them (CPU does).
        from .tables import record_identity

        record_identity(self._varmoe_state, self.config)  # vLLM's model classes keep the HF config as .config
        return loaded

    return type(PREFIX + arch, (base,), {"__init__": __init__, "load_weights": load_weights, "__module__": __name__,
                                         "__doc__": f"vLLM's {arch} with VAR installed at construction."})


def register() -> None:
    """Register the Var* architectures with vLLM (idempotent; the `vllm.general_plugins` hook)."""
    from vllm import ModelRegistry

    for arch in SUPPORTED:
        if PREFIX + arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(PREFIX + arch, f"{__name__}:{PREFIX}{arch}")


def __getattr__(name: str) -> type:
    """`var_moe.vllm.models:VarMixtralForCausalLM` (the registry's lazy import) builds the class."""
    if name.startswith(PREFIX) and name[len(PREFIX):] in SUPPORTED:
        return var_class(name[len(PREFIX):])
    raise AttributeError(name)
