"""Routing replay: run a forward with given experts per token and MoE layer, to re-score a recorded
request exactly (the replay side of transformers' `moe_routing=`, which the installed transformers
does not have, done through the adapters).

    with RoutingReplay(model, experts_TLK):          # [tokens][MoE layers][k], the server's layout
        logits = model(input_ids=ids_1T).logits
    logits = forward_with_routing(model, ids_1T, experts_TLK)   # the same, in one call

Inside the block every MoE block's router is a `_ReplayRouter` (installed with setattr on the
block, restored on exit, like the VAR wrapper's patch): it calls the router that was installed
(the model's own, or a VAR router) for its logits and decision, and returns the given experts.
Weights: a row whose given experts equal the router's own choice, in order, keeps the router's
weights bit for bit (so replaying a capture of the same forward gives the original logits
exactly); any other row gets the weights the family's router would give the given experts
(`adapter.chosen_weights`: e.g. renormalised softmax probabilities for Mixtral, raw ones for
Qwen2-MoE, sigmoid scores times the routed scaling factor for DeepSeek-V3). The experts' empty
slot (index E) gets weight 0.
The forward must route exactly the given rows: T = batch x sequence rows of `input_ids`, in order
(padding rows included); a mismatch is an error, not a silent partial replay.

Shapes: T tokens, L MoE layers, K top-k, E experts. Test: `pytest tests/test_routing_replay.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import get_adapter
from .errors import InvalidInputError


def as_routing_tensor(experts: Any) -> torch.Tensor:
    """[tokens][layers][k] expert ids (nested lists, numpy or torch) as an int64 tensor."""
    t = torch.as_tensor(np.asarray(experts) if not isinstance(experts, torch.Tensor) else experts)
    if t.dim() != 3 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InvalidInputError(f"routing must be integer expert ids shaped [tokens][MoE layers][k], got {tuple(t.shape)} "
                                f"{t.dtype}")
    return t.long()


class _ReplayRouter(nn.Module):
    def __init__(self, inner: nn.Module, experts_TK: torch.Tensor, adapter: Any, layer: int):
        super().__init__()
        self.inner, self.adapter, self.layer = inner, adapter, layer
        self.experts_TK = experts_TK
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor):
        logits, w_TK, idx_TK = self.inner(hidden_states)
        t = idx_TK.reshape(-1, idx_TK.shape[-1]).shape[0]
        given_TK = self.experts_TK
        if given_TK.shape != (t, idx_TK.shape[-1]):
            raise InvalidInputError(f"routing replay: MoE layer {self.layer} routes {t} rows of top-{idx_TK.shape[-1]}, "
                                    f"the given routing has {tuple(given_TK.shape)}")
        self.calls += 1
        e = self.adapter.num_experts
        if int(given_TK.min()) < 0 or int(given_TK.max()) > e:
            raise InvalidInputError(f"routing replay: expert ids must lie in [0, {e}] (E = the empty slot)")
        given_TK = given_TK.to(idx_TK.device)
        own_w_TK = w_TK.reshape(t, -1)
        own_idx_TK = idx_TK.reshape(t, -1)
        same_T = (given_TK == own_idx_TK.long()).all(-1)
        g_TK = self.adapter.chosen_weights(logits.reshape(t, -1), given_TK)
        out_w = torch.where(same_T[:, None], own_w_TK, g_TK.to(own_w_TK.dtype))
        out_idx = torch.where(same_T[:, None], own_idx_TK, given_TK.to(own_idx_TK.dtype))
        return logits, out_w.reshape(w_TK.shape), out_idx.reshape(idx_TK.shape)


class RoutingReplay:
    """Context manager: every MoE router of `model` returns the given experts (see the module doc)."""

    def __init__(self, model: Any, experts_TLK: Any, adapter: Any = None):
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.moe = self.adapter.moe_layers(model)
        self.experts_TLK = as_routing_tensor(experts_TLK)
        if self.experts_TLK.shape[1] != len(self.moe) or self.experts_TLK.shape[2] != self.adapter.top_k:
            raise InvalidInputError(f"routing replay: the model has {len(self.moe)} MoE layers of top-{self.adapter.top_k}, "
                                    f"the routing is shaped {tuple(self.experts_TLK.shape)}")
        self._saved: list[tuple[Any, nn.Module]] = []
        self.routers: list[_ReplayRouter] = []

    def __enter__(self) -> "RoutingReplay":
        for slot, m in enumerate(self.moe):
            current = getattr(m.block, m.router_attr)
            replay = _ReplayRouter(current, self.experts_TLK[:, slot].contiguous(), self.adapter, m.layer)
            self._saved.append((m, current))
            self.routers.append(replay)
            setattr(m.block, m.router_attr, replay)
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, current in reversed(self._saved):
            setattr(m.block, m.router_attr, current)
        self._saved.clear()


@torch.no_grad()
def forward_with_routing(model: Any, input_ids: torch.Tensor, experts_TLK: Any, **kwargs: Any) -> torch.Tensor:
    """Logits (B, S, V) of one forward of `input_ids` whose MoE layers route as `experts_TLK` says."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    with RoutingReplay(model, experts_TLK) as replay:
        out = model(input_ids=ids.to(next(model.parameters()).device), **kwargs)
    if any(r.calls != 1 for r in replay.routers):
        raise InvalidInputError("routing replay: every MoE router must run exactly once in the forward")
    return out.logits
