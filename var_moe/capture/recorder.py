"""RoutingRecorder: forward hooks on the real router modules, with token ids aligned to each row.

For every forward of the model and every hooked MoE layer, the recorder calls
`callback(layer, tokens, decision)` with the `TokenBatch` of the forward (ids, padding, context)
and the adapter's `RouterDecision` (float32 probabilities, the top-k indices and weights the
experts actually received). It never recomputes routing from other tensors: it reads the
router's own return value.

The hook sits on whatever module is at the router attribute when the recorder is attached: the
learned router normally, or a VAR router if one was installed first (then it records the
routing that was actually used).

Use:
    with RoutingRecorder(model, callback=fn, window=1):
        model(input_ids=..., attention_mask=...)

Test: `pytest tests/test_recorder.py`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from ..adapters import RouterDecision, get_adapter
from ..errors import VarMoeError
from ..token_tracker import TokenBatch, TokenTracker

Callback = Callable[[int, TokenBatch, RouterDecision], None]


class MissingTokenIdsError(VarMoeError, RuntimeError):
    """The forward was called without `input_ids` (e.g. inputs_embeds), so rows cannot be attributed."""


class RoutingRecorder:
    def __init__(
        self,
        model: nn.Module,
        callback: Callback,
        layer_indices: Sequence[int] | None = None,
        window: int = 1,
        adapter: Any | None = None,
    ):
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.layers = self.adapter.select_moe_layers(model, layer_indices, "layers")
        self.callback = callback
        self.tracker = TokenTracker(model, window=window)
        self._handles: list[Any] = []

    @property
    def layer_indices(self) -> list[int]:
        return [m.layer for m in self.layers]

    def _make_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            tokens = self.tracker.current
            if tokens is None:
                raise MissingTokenIdsError("routing capture needs input_ids in every forward (got inputs_embeds)")
            decision = self.adapter.decision(output)
            if decision.topk_idx_TK.shape[0] != tokens.ids_T.shape[0]:
                raise RuntimeError(
                    f"layer {layer}: router saw {decision.topk_idx_TK.shape[0]} rows but the batch has "
                    f"{tokens.ids_T.shape[0]} tokens"
                )
            self.callback(layer, tokens, decision)

        return hook

    def attach(self) -> "RoutingRecorder":
        if self._handles:
            return self
        self.tracker.attach()
        for m in self.layers:
            router = getattr(m.block, m.router_attr)
            self._handles.append(router.register_forward_hook(self._make_hook(m.layer)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.tracker.detach()

    def __enter__(self) -> "RoutingRecorder":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()
