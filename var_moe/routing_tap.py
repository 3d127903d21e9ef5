"""`RoutingTap`: forward hooks on a transformers MoE model that count expert load on the device and,
on request, keep the last forward's routing (the experts each row was sent to, per MoE layer).

    tap = RoutingTap(model, count=True)          # hooks attached; counts in tap.load (ExpertLoad)
    tap.recording = True                         # also keep every forward's experts
    model(input_ids=ids, attention_mask=mask)
    tap.last_LTK                                 # (MoE layers, B*S, K) expert ids of that forward

Hooks: a forward hook on the module each MoE block calls as its router (the VAR router when a
`VARModelWrapper` is installed, so what is counted is what the experts received, table rows
included; the original router otherwise), which only keeps references to the outputs; a pre-hook
on the decoder (`model.model`) that notes which rows are padding (its `attention_mask`, last S
columns: the rows of this forward); and a hook after the decoder that adds the whole forward to
the counters at once (`ExpertLoad.count_forward`: stacked over layers, a dozen tensor ops, no host
synchronisation). Entropy is taken from the router's first output, read the way the adapter reads
it (logits, probabilities or sigmoid scores: decided once, on the first forward).
`detach()` removes every hook. Test: `pytest tests/test_expert_load.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import get_adapter
from .adapters.base import looks_like_probabilities
from .expert_load import ExpertLoad


class RoutingTap:
    def __init__(self, model: Any, count: bool = True, adapter: Any = None):
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.moe = self.adapter.moe_layers(model)
        self.layers = [m.layer for m in self.moe]
        self.num_experts, self.top_k = self.adapter.num_experts, self.adapter.top_k
        self.count = bool(count)
        self.recording = False
        self.load: ExpertLoad | None = None
        self.last_LTK: torch.Tensor | None = None  # the last forward's experts, while recording
        self._outs: list[tuple] = []
        self._valid_T: torch.Tensor | None = None
        self._read_as: str | None = None  # "logits" | "probs" | "sigmoid"
        self._handles: list[Any] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "RoutingTap":
        if self._handles:
            return self
        device = next(self.model.parameters()).device
        if self.count and self.load is None:
            self.load = ExpertLoad(len(self.moe), self.num_experts, device)
        for m in self.moe:
            router = getattr(m.block, m.router_attr)  # the module the block calls now (VAR's, if installed)
            self._handles.append(router.register_forward_hook(self._on_router))
        decoder = getattr(self.model, "model", self.model)
        self._handles.append(decoder.register_forward_pre_hook(self._on_start, with_kwargs=True))
        self._handles.append(decoder.register_forward_hook(self._on_end))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._outs.clear()

    # -- hooks -------------------------------------------------------------------------------------
    def _on_start(self, module, args, kwargs) -> None:
        self._outs.clear()
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self._valid_T = None
        if ids is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._valid_T = mask[:, -ids.shape[1]:].reshape(-1).bool()

    def _on_router(self, module, args, out) -> None:
        if isinstance(out, tuple) and len(out) == 3:
            self._outs.append(out)

    def _on_end(self, module, args, out) -> None:
        outs, self._outs = self._outs, []
        if len(outs) != len(self.moe):  # a partial forward (e.g. a hook called a router itself): skip
            return
        with torch.no_grad():
            idx_LTK = torch.stack([o[2].reshape(-1, o[2].shape[-1]) for o in outs])
            if self.recording:
                self.last_LTK = idx_LTK.detach()
            if self.count and self.load is not None:
                valid_T = self._valid_T
                if valid_T is not None and valid_T.shape[0] != idx_LTK.shape[1]:
                    valid_T = None
                self.load.count_forward(idx_LTK, self._entropy([o[0] for o in outs]), valid_T)

    def _entropy(self, scores: list[torch.Tensor]) -> torch.Tensor:
        s_LTE = torch.stack([s.reshape(-1, s.shape[-1]) for s in scores])
        if self._read_as is None:
            self._read_as = ("sigmoid" if self.adapter.score_function == "sigmoid"
                             else "probs" if looks_like_probabilities(s_LTE[0]) else "logits")
        if self._read_as == "logits":
            return ExpertLoad.entropy_of_logits(s_LTE)
        if self._read_as == "sigmoid":
            p = torch.sigmoid(s_LTE.float())
            return ExpertLoad.entropy(p / p.sum(-1, keepdim=True).clamp_min(1e-20))
        return ExpertLoad.entropy(s_LTE)
