"""Load a `varmoe build-tables` file (var_moe.var.tables) into an installed vLLM model.

Its metadata must match the model vLLM loaded, the router fingerprint included, recomputed from the
gates vLLM loaded (var_moe.identity: the same weights in any dtype pass, other weights do not). The
tables are laid out as served (`served_tables`) and copied in place into the device buffers
(compiled graphs and CUDA graphs keep pointing at them); pair entries also go into the host's key
index (rows.index_pairs).
Test: `pytest tests/test_vllm_routing.py tests/test_served_decision.py tests/vllm_engine/test_vllm_exact.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from ..identity import routers_fingerprint
from ..var.served import ServedTables, split_key
from ..var.tables import VARTables
from .routing import VarState
from .rows import index_pairs


@torch.no_grad()
def record_identity(state: VarState, hf_config: Any) -> None:
    """The identity fields `VARTables.check_identity` compares, from the weights vLLM just loaded
    (before it repacks them)."""
    layers = sorted(state.layers)
    state.identity = {
        "model_type": getattr(hf_config, "model_type", None),
        "vocab_size": int(hf_config.vocab_size),
        "num_experts": state.layers[layers[0]].num_experts,
        "top_k": int(state.experts_SVK.shape[2]),
        # the stored checkpoint's routers when the gates vLLM loaded are they in its dtype (bf16 on
        # most CPUs and GPUs), so tables built on the float32 model are recognised (var_moe.identity)
        "router_fingerprint": routers_fingerprint({l: dict(state.layers[l].gate.state_dict()) for l in layers},
                                                  state.model_dir),
        "layers": layers,
    }


def loaded_identity(state: VarState) -> dict[str, Any]:
    """The identity `record_identity` recorded."""
    if state.identity is None:
        raise RuntimeError("the model's weights have not been loaded yet (no router fingerprint)")
    return dict(state.identity)


def load_tables(state: VarState, path: str | Path, check_fingerprint: bool = True) -> dict[str, Any]:
    """Copy the tables at `path` into the model's buffers; returns {layer: entries} and the source."""
    tables = VARTables.load(path)  # no model: identity is checked against the vLLM model below
    ident = loaded_identity(state)
    tables.check_identity(ident, check_fingerprint, str(path), "the model vLLM loaded")
    extra = sorted((set(tables.layers) | set(tables.pair_tier)) - set(state.layers))
    if extra:
        raise InvalidInputError(f"VAR tables {path} have layers {extra} that are not MoE layers of this model "
                                f"({sorted(state.layers)})")
    fill_tables(state, tables)
    return {"sizes": tables.sizes(), "source": str(path), "config": tables.metadata.get("config"),
            "fingerprint": ident["router_fingerprint"], "pair_sizes": tables.pair_sizes(),
            "pair_entries": sum(tables.pair_sizes().values()), "pair_capacity": state.pair_capacity}


@torch.no_grad()
def fill_tables(state: VarState, tables: VARTables) -> None:
    """Write table entries into the buffers in place; layers without a table get an empty one. The
    pair entries are checked before anything is written."""
    served = served_tables(state, tables)
    state.experts_SVK.copy_(served.idx_LVK)
    state.weights_SVK.copy_(served.w_LVK)
    state.member_SV.copy_(served.member_LV)
    if state.pair_sel_NS is not None:
        n, v = served.pair_keys_X.shape[0], served.vocab
        state.pair_tok_X.fill_(-1)
        state.pair_tok_X[:n] = split_key(served.pair_keys_X, v)[2]
        state.pair_idx_XK[:n] = served.pair_idx_XK
        state.pair_w_XK[:n] = served.pair_w_XK
        index_pairs(state, served.pair_keys_X.cpu().numpy(), served.member_LV.t().cpu().numpy())


def served_tables(state: VarState, tables: VARTables) -> ServedTables:
    """The tables as served on this model's device (`ServedTables.build`; slot = the layer's index among
    the MoE layers; weights scaled with the family's `weight_scale`, then divided by the factor vLLM's MoE
    runner multiplies the routed output by after the router: DeepSeek's `routed_scaling_factor`). Refuses
    more pair entries than the capacity, malformed ones, and a family whose weight sum vLLM's router does
    not reproduce (a renormalising vLLM router sums to its own scaling factor, any other to no constant):
    vLLM would then route differently from the model the tables were certified on."""
    _, v, k = state.experts_SVK.shape
    e = next(iter(state.layers.values())).num_experts
    by_slot = sorted(state.layers, key=lambda l: state.layers[l].slot)
    if [state.layers[l].slot for l in by_slot] != list(range(len(by_slot))):
        raise RuntimeError(f"the MoE layers' slots must be 0..{len(by_slot) - 1} (install_var numbers them)")
    # load_tables refused layers this model does not have
    pairs = [tables.pair_tier[l] for l in by_slot if l in tables.pair_tier]
    n = sum(p.size for p in pairs)
    if n > state.pair_capacity:
        raise InvalidInputError(
            f"the VAR tables hold {n} (previous, token) entries but this vLLM engine was built with room for "
            f"{state.pair_capacity}; start it with a pair capacity of at least {n} "
            "(var_moe.vllm.engine_kwargs(..., pair_capacity=N); the server: --vllm-pair-capacity N)")
    ok = all(p.sets_PK.reshape(p.size, -1).shape[1] == k and bool(((p.sets_PK >= 0) & (p.sets_PK < e)).all())
             and bool(((p.keys_P >= 0) & (p.keys_P < v * v)).all())
             and bool((p.keys_P[1:] > p.keys_P[:-1]).all()) for p in pairs if p.size)
    if not ok:
        raise InvalidInputError(f"the tables' (previous, token) entries are malformed (keys must ascend within "
                                f"[0, {v}**2) per layer, sets hold {k} experts below {e})")
    for l in by_slot:
        lv = state.layers[l]
        # what vLLM's router's top-k weights sum to (None: no constant), and what the family's do
        # once the output scale vLLM applies after the router is taken out
        vllm_sum = lv.router_scale if lv.renormalize else None
        family_sum = None if lv.weight_scale is None else lv.weight_scale / lv.output_scale
        if (vllm_sum is None) != (family_sum is None) or (
                vllm_sum is not None and abs(vllm_sum - family_sum) > 1e-6 * abs(vllm_sum)):
            raise InvalidInputError(
                f"layer {l}: the model family's router weights sum to {family_sum} (None: no constant; after vLLM's "
                f"output scale {lv.output_scale}), but vLLM's router's sum to {vllm_sum}; "
                "vLLM routes this model differently from the model the tables were built on")
    return ServedTables.build(tables.layers, tables.pair_tier, by_slot,
                              {l: state.layers[l].weight_scale for l in by_slot}, v, k, state.member_SV.device,
                              output_scales={l: state.layers[l].output_scale for l in by_slot})


@torch.no_grad()
def clear_tables(state: VarState) -> None:
    state.member_SV.zero_()
    if state.pair_sel_NS is not None:
        state.pair_tok_X.fill_(-1)
        no_tokens_VS = np.zeros((state.pair_vocab, state.pair_rows_US.shape[1]), dtype=bool)
        index_pairs(state, np.zeros(0, dtype=np.int64), no_tokens_VS)
