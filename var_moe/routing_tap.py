"""`RoutingTap`: forward hooks on a transformers MoE model that count expert load on the device and,
on request, keep the last forward's routing (the experts each row was sent to, per MoE layer).

    tap = RoutingTap(model, count=True)          # hooks attached; counts in tap.load (ExpertLoad)
    tap.recording = True                         # also keep every forward's experts
    model(input_ids=ids, attention_mask=mask)
    tap.last_LTK                                 # (MoE layers, B*S, K) expert ids of that forward
    tap.last_fast_LT                             # (MoE layers, B*S) rows a VAR table served (with
                                                 # tap.fast_rows = wrapper.last_fast_rows), else None
    RoutingTap.for_wrapper(model, wrapper)       # also count per VAR tier (the server's tap)

Hooks: on the module each MoE block calls as its router (the VAR router when a `VARModelWrapper`
is installed, so what is counted is what the experts received, table rows included; the original
router otherwise), a forward hook that only keeps references to the outputs, or, on VAR's router,
its `output_sink` (the router hands them over itself, sparing a hook dispatch per layer); a pre-hook
on the decoder (`model.model`) that notes which rows are padding (its `attention_mask`, last S
columns: the rows of this forward); and a hook after the decoder that files the forward's router
outputs for counting. Counting is deferred and batched: the filed forwards are added to the
counters together (`ExpertLoad.count_forward` over their concatenated rows: a couple of dozen
tensor ops for all of them, no host synchronisation) once they hold `flush_rows` rows or
`flush_forwards` forwards, and whenever the counters are read (`read()`, from any thread; a lock
orders it with the engine thread's filing). A decode step therefore costs the hooks' Python calls
and a list append, not a dozen small tensor ops each (about 0.3 ms a step on this machine's CPU,
1.5% of a 16-row reference-model step). Entropy is taken from the router's first output, read the
way the adapter reads it (logits, probabilities or sigmoid scores: decided once). Filing keeps
references to the router outputs and the attention mask until the flush: callers must not change
them in place meanwhile (transformers and the server's decoder make new tensors every step).
With `tiers` (("fast", "learned") on a VAR-wrapped model) each filed forward also keeps its rows'
tier: a forward in VAR mode (`var_mode()`) has fast rows where `fast_rows()` says a table served
them and learned rows elsewhere; a baseline forward's rows are in no tier (they count in the
totals only), as on the vLLM engine.
`detach()` counts what is filed and removes every hook. Test: `pytest tests/test_expert_load.py`.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .adapters import get_adapter
from .adapters.base import looks_like_probabilities
from .expert_load import ExpertLoad


class RoutingTap:
    flush_rows = 8192  # filed router rows (all forwards together) that trigger counting them
    flush_forwards = 128

    def __init__(self, model: Any, count: bool = True, adapter: Any = None, tiers: tuple[str, ...] = (),
                 var_mode: Any = None):
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.moe = self.adapter.moe_layers(model)
        self.layers = [m.layer for m in self.moe]
        self.num_experts, self.top_k = self.adapter.num_experts, self.adapter.top_k
        self.count = bool(count)
        self.tiers, self.var_mode = tuple(tiers), var_mode  # tier 0 = table rows, 1 = the other VAR rows
        self.recording = False
        self.load: ExpertLoad | None = None
        self.last_LTK: torch.Tensor | None = None  # the last forward's experts, while recording
        # optional: (layers, rows) bool of the rows a VAR table served in the forward that just ran
        self.fast_rows: Any = None
        self.last_fast_LT: torch.Tensor | None = None
        self._outs: list[tuple] = []
        self._read_as: str | None = None  # "logits" | "probs" | "sigmoid"
        self._handles: list[Any] = []
        self._sinks: list[Any] = []  # routers that call self._on_output themselves
        # forwards filed, not yet counted: per layer experts and scores, per forward (mask, S) and rows
        self._idx: list[list[torch.Tensor]] = [[] for _ in self.moe]
        self._scores: list[list[torch.Tensor]] = [[] for _ in self.moe]
        self._masks: list[tuple[Any, int]] = []
        self._tiers: list[Any] = []  # per filed forward: (layers, rows) tier, or None (no tier)
        self._filed_rows = 0
        self._mask: tuple[torch.Tensor, int] | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_wrapper(cls, model: Any, wrapper: Any = None, count: bool = True, adapter: Any = None) -> "RoutingTap":
        """The tap of `model` as served: with a `VARModelWrapper`, per-tier counting (a forward in VAR
        mode has fast rows where its tables served them); without one, totals only."""
        if wrapper is None:
            return cls(model, count=count, adapter=adapter)
        from .var.served import TIERS

        tap = cls(model, count=count, adapter=adapter, tiers=TIERS, var_mode=lambda: wrapper.var_enabled)
        tap.fast_rows = wrapper.last_fast_rows
        return tap

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "RoutingTap":
        if self._handles:
            return self
        device = next(self.model.parameters()).device
        if self.count and self.load is None:
            self.load = ExpertLoad(len(self.moe), self.num_experts, device, tiers=self.tiers)
        for m in self.moe:
            router = getattr(m.block, m.router_attr)  # the module the block calls now (VAR's, if installed)
            if hasattr(router, "output_sink") and router.output_sink is None:  # VAR's router hands its
                # outputs over itself, sparing a hook dispatch (a second tap on it gets a hook)
                router.output_sink = self._on_output
                self._sinks.append(router)
            else:
                self._handles.append(router.register_forward_hook(self._on_router))
        decoder = getattr(self.model, "model", self.model)
        self._handles.append(decoder.register_forward_pre_hook(self._on_start, with_kwargs=True))
        self._handles.append(decoder.register_forward_hook(self._on_end))
        return self

    def detach(self) -> None:
        self.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for router in self._sinks:
            router.output_sink = None
        self._sinks.clear()
        self._outs.clear()

    # -- hooks -------------------------------------------------------------------------------------
    def _on_start(self, module, args, kwargs) -> None:
        self._outs.clear()
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        # the rows of this forward are the mask's last S columns (sliced when counted)
        self._mask = (mask, ids.shape[1]) if ids is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2 \
            else None

    def _on_router(self, module, args, out) -> None:
        self._on_output(out)

    def _on_output(self, out) -> None:
        if isinstance(out, tuple) and len(out) == 3:
            self._outs.append(out)

    def _on_end(self, module, args, out) -> None:
        outs, self._outs = self._outs, []
        if len(outs) != len(self.moe):  # a partial forward (e.g. a hook called a router itself): skip
            return
        if self.recording:
            with torch.no_grad():
                idx_LTK = torch.stack([o[2].reshape(-1, o[2].shape[-1]) for o in outs]).detach()
            self.last_LTK = idx_LTK
            fast = self.fast_rows() if self.fast_rows is not None else None
            self.last_fast_LT = fast if fast is not None and fast.shape == idx_LTK.shape[:2] else None
        if self.count and self.load is not None:
            rows = outs[0][2].numel() // self.top_k if outs[0][2].dim() != 2 else outs[0][2].shape[0]
            tier = None
            if self.tiers and self.var_mode is not None and self.var_mode():
                fast = self.fast_rows() if self.fast_rows is not None else None
                tier = fast if fast is not None and fast.shape == (len(self.moe), rows) else False  # False: all learned
            with self._lock:  # list appends only: the tensor work waits for flush()
                self._tiers.append(tier)
                for l, o in enumerate(outs):
                    self._idx[l].append(o[2])
                    self._scores[l].append(o[0])
                self._masks.append((self._mask, rows))
                self._filed_rows += rows
                full = self._filed_rows >= self.flush_rows or len(self._masks) >= self.flush_forwards
            if full:
                self.flush()

    def flush(self) -> None:
        """Add every filed forward to the counters (tensor ops only; any thread)."""
        with self._lock:
            idx, scores, masks, tiers = self._idx, self._scores, self._masks, self._tiers
            self._idx, self._scores, self._masks, self._tiers = [[] for _ in self.moe], [[] for _ in self.moe], [], []
            self._filed_rows = 0
            if not masks or self.load is None:
                return
            with torch.no_grad():
                k = self.top_k
                flat = lambda t, w: t if t.dim() == 2 else t.reshape(-1, w)  # noqa: E731
                idx_LTK = torch.stack([torch.cat([flat(t, k) for t in per]) if len(per) > 1 else flat(per[0], k)
                                       for per in idx])
                s_LT = [torch.cat([flat(t, t.shape[-1]) for t in per]) if len(per) > 1 else per[0] for per in scores]
                valid_T = None
                if any(m is not None for m, _ in masks):
                    dev = idx_LTK.device
                    parts = [m[0][:, -m[1]:].reshape(-1) if m is not None else torch.ones(n, dtype=torch.long, device=dev)
                             for m, n in masks]
                    valid_T = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(dev).bool()
                    if valid_T.shape[0] != idx_LTK.shape[1]:  # a mask that did not match its rows: count them all
                        valid_T = None
                tier_LT = None
                if any(t is not None for t in tiers):  # 0 fast, 1 learned, -1 baseline forwards
                    dev, n_layers = idx_LTK.device, len(self.moe)
                    parts = [torch.full((n_layers, n), -1 if t is None else 1, dtype=torch.long, device=dev)
                             if t is None or t is False else (~t).long().to(dev) for t, (_, n) in zip(tiers, masks)]
                    tier_LT = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
                self.load.count_forward(idx_LTK, self._entropy(s_LT), valid_T, tier_LT)

    def read(self):
        """The counters (`LoadReading`) with every filed forward counted; None when not counting."""
        if self.load is None:
            return None
        self.flush()
        return self.load.read()

    def _entropy(self, scores: list[torch.Tensor]) -> torch.Tensor:
        s_LTE = torch.stack([s.reshape(-1, s.shape[-1]) for s in scores])
        if self._read_as is None:
            self._read_as = ("sigmoid" if self.adapter.score_function == "sigmoid"
                             else "probs" if looks_like_probabilities(s_LTE[0]) else "logits")
        if self._read_as == "logits":
            return ExpertLoad.entropy_of_logits(s_LTE)
        if self._read_as == "sigmoid":  # the adapter's normalised sigmoid scores
            return ExpertLoad.entropy(self.adapter.probabilities(s_LTE))
        return ExpertLoad.entropy(s_LTE)
