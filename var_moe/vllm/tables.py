"""Load a builtin VAR tables file into an installed vLLM model, refusing tables of other weights.

The file is the one `varmoe build-tables` writes for the builtin engine (var_moe.var.tables). Before
any entry is used, its metadata must match the model vLLM loaded: model type, vocabulary, expert
count, top-k, MoE layers, and the router fingerprint, recomputed here from the gate weights vLLM
loaded (the same SHA-256 over the same parameter names and float32 bytes as the builtin engine, so
a table built on the Hugging Face model is accepted by vLLM on the same weights, and by neither on
other weights or another dtype). Entries are copied into the existing device buffers (in place:
compiled graphs and CUDA graphs keep pointing at them). Weights are stored scaled the way the
router scales its own: renormalising routers sum their top-k weights to 1, the others keep the
table's raw mass. (Previous, token) entries, which the builtin router serves, are not served here;
the reply counts them. Test: `pytest tests/vllm_engine/test_vllm_exact.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError
from ..var.tables import VARTables, router_fingerprint
from .routing import VarState


@torch.no_grad()
def record_identity(state: VarState, hf_config: Any) -> None:
    """The builtin engine's identity fields, from the weights vLLM just loaded (before it repacks them)."""
    layers = sorted(state.layers)
    first = state.layers[layers[0]]
    state.identity = {
        "model_type": getattr(hf_config, "model_type", None),
        "vocab_size": int(hf_config.vocab_size),
        "num_experts": int(first.gate.weight.shape[0]),
        "top_k": int(first.experts_VK.shape[1]),
        "router_fingerprint": router_fingerprint([state.layers[l].gate for l in layers]),
        "layers": layers,
    }


def model_identity(state: VarState) -> dict[str, Any]:
    if state.identity is None:
        raise RuntimeError("the model's weights have not been loaded yet (no router fingerprint)")
    return dict(state.identity)


def load_tables(state: VarState, path: str | Path, check_fingerprint: bool = True) -> dict[str, Any]:
    """Copy the tables at `path` into the model's buffers; returns {layer: entries} and the source."""
    tables = VARTables.load(path)  # no model: identity is checked against the vLLM model below
    ident = model_identity(state)
    keys = ["model_type", "vocab_size", "num_experts", "top_k"] + (["router_fingerprint"] if check_fingerprint else [])
    for key in keys:
        if tables.metadata.get(key) != ident[key]:
            raise InvalidInputError(
                f"VAR tables {path} were built for {key}={tables.metadata.get(key)!r} (model "
                f"{tables.metadata.get('model')!r}) but the model vLLM loaded has {key}={ident[key]!r}; "
                "rebuild them with `varmoe build-tables` for these weights")
    extra = sorted(set(tables.layers) - set(state.layers))
    if extra:
        raise InvalidInputError(f"VAR tables {path} have layers {extra} that are not MoE layers of this model "
                                f"({sorted(state.layers)})")
    fill_tables(state, tables)
    # (previous, token) entries are served by the builtin router only: said, not silently dropped
    return {"sizes": tables.sizes(), "source": str(path), "config": tables.metadata.get("config"),
            "fingerprint": ident["router_fingerprint"], "pair_entries_not_served": sum(tables.pair_sizes().values())}


@torch.no_grad()
def fill_tables(state: VarState, tables: VARTables) -> None:
    """Write table entries into the buffers in place; layers without a table get an empty one."""
    for layer, lv in state.layers.items():
        t = tables.layers.get(layer)
        if t is None:
            lv.member_V.zero_()
            continue
        dev = lv.member_V.device
        scale_V = torch.ones_like(t.mass_V) if lv.renormalize else t.mass_V
        lv.experts_VK.copy_(t.experts_VK.to(dev))
        lv.weights_VK.copy_((t.weights_VK * scale_V[:, None]).to(dev))
        lv.member_V.copy_(t.member_V.to(dev))


@torch.no_grad()
def clear_tables(state: VarState) -> None:
    for lv in state.layers.values():
        lv.member_V.zero_()
