"""Where a forward pass spends its time: router, experts, attention, output layer, the rest.

`forward_cost_shares(model, input_ids, repeats)` times module categories with forward pre/post
hooks (CPU execution is synchronous, so wall time between the hooks is the module's own time;
on CUDA the hooks synchronise, which slows the run but keeps the shares honest). Shares are of
the whole forward's wall time, median over repeats after a warm-up. Routers and experts are found
through the adapter; attention is every decoder layer's `self_attn`; the output layer is the LM head.
Test: `pytest tests/test_profiling.py`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .adapters import get_adapter

CATEGORIES = ("router", "experts", "attention", "output_layer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_cost_shares(model: Any, input_ids: torch.Tensor, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    modules: dict[str, list[torch.nn.Module]] = {
        "router": [getattr(m.block, m.router_attr) for m in adapter.moe_layers(model)],
        "experts": [m.experts for m in adapter.moe_layers(model)],
        "attention": [layer.self_attn for layer in adapter.decoder_layers(model)],
        "output_layer": [model.get_output_embeddings()],
    }
    spent = {c: 0.0 for c in CATEGORIES}
    starts: dict[int, float] = {}
    handles = []
    for cat, mods in modules.items():
        for mod in mods:
            def pre(m, a, _cat=cat):
                _sync(device)
                starts[id(m)] = time.perf_counter()

            def post(m, a, o, _cat=cat):
                _sync(device)
                spent[_cat] += time.perf_counter() - starts.pop(id(m))

            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
    ids = input_ids.to(device)
    rows = []
    try:
        for i in range(warmup + repeats):
            for c in spent:
                spent[c] = 0.0
            _sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            _sync(device)
            total = time.perf_counter() - t0
            if i >= warmup:
                rows.append({**{c: spent[c] / total for c in CATEGORIES}, "total_s": total})
    finally:
        for h in handles:
            h.remove()
    shares = {c: statistics.median(r[c] for r in rows) for c in CATEGORIES}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return {
        "shares": shares,
        "forward_seconds_median": statistics.median(r["total_s"] for r in rows),
        "tokens": int(ids.numel()),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
