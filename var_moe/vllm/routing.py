"""VAR inside vLLM's MoE layers: token ids to the routers, table decisions as tensor ops, device counters.

`install_var(model)` runs when the model object is built (models.py), before vLLM compiles it, and
gives three kinds of module a subclass of their own class (no model code copied, parameter names
and the weight loader's tree unchanged):
- the token embedding records the step's `input_ids` on a shared `VarState` (vLLM's Mixtral,
  Qwen2-MoE, Qwen3-MoE, OLMoE and GPT-OSS blocks call `experts(hidden, router_logits)` without them);
- each MoE runner (`FusedMoE` / `MoERunner`) passes them on when its caller gave none (vLLM's
  routers already take `input_ids`, as DeepSeek-V4's hash routing does);
- each router's `_compute_routing` computes the learned decision, then, for VAR-mode rows whose
  token has an entry in this layer (else whose (previous, token) pair has one), takes the entry's
  experts and weights (`where`). Baseline rows and empty tables keep every learned value.

Every layer's table sits in the shared `VarState`, stacked by layer slot. Which rows run VAR
(`rows_N`) and each row's pair entry per layer (`pair_sel_NS`) are written before each forward by
the runner hook in rows.py. Everything on the device is tensor work on fixed buffers written in
place, so it stays valid in compiled graphs and CUDA graphs. The learned decision is computed
anyway, so verification is a free audit of every fast row.

Shapes: T tokens, K top-k, V vocabulary, E experts, X pair-buffer slots (capacity + 1), S layer
slots. The decision is `var.served.decide`'s (tests/test_served_decision.py checks it).
Test: `pytest tests/test_vllm_routing.py tests/vllm_engine/test_vllm_exact.py` (the second: vLLM environment).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


COUNTERS = ("fast", "learned", "audit_agree", "audit_disagree")  # VarState.counts_SC's columns
AGREE, DISAGREE = COUNTERS.index("audit_agree"), COUNTERS.index("audit_disagree")
# what each (row, layer slot) of a step was, in VarState.code_NS: a VAR-mode row served from a table
# whose experts equal the learned router's (FAST_SAME) or not (FAST_OTHER), a VAR-mode row the
# learned router decided (LEARNED), a baseline-mode or padding row (-1)
FAST_SAME, LEARNED, FAST_OTHER = 0, 1, 2


def tier_of(code):
    """A row's tier from its code (torch or numpy): FAST_SAME and LEARNED are already the indices of
    "fast" and "learned" in `var.served.TIERS` (expert_load.py checks), FAST_OTHER becomes "fast",
    -1 (a baseline row) stays in none."""
    return code - (code == FAST_OTHER) * (FAST_OTHER - FAST_SAME)


class VarState:
    """What every patched module of one model shares: the step's token ids, which rows run VAR, and
    the pair tier (device buffers of fixed capacity plus their host mirror)."""

    def __init__(self, device: torch.device, max_tokens: int, pair_capacity: int = 0, top_k: int = 1,
                 num_layers: int = 0, vocab_size: int = 0):
        self.ids: torch.Tensor | None = None  # set by the embedding during a forward
        # per-token VAR mode of the current step (rows.py writes it in place before each forward;
        # slots past the step's tokens, e.g. CUDA-graph padding, stay False)
        self.rows_N = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        if pair_capacity < 0:
            raise ValueError(f"pair_capacity must be >= 0, got {pair_capacity}")
        self.pair_capacity = int(pair_capacity)
        self.pair_sel_NS: torch.Tensor | None = None
        # host index of the loaded entries (rows.index_pairs): the distinct previous * V + token of
        # all slots' entries, sorted, and each one's entry per slot (the empty slot where the slot
        # has none or the token has a token entry there: token entries win)
        self.pair_entries = 0
        self.pair_vocab = 0
        self.pair_bases_U = np.zeros(0, dtype=np.int64)
        self.pair_rows_US = np.zeros((0, num_layers), dtype=np.int64)
        self.pair_rows_host: dict[int, np.ndarray] = {}  # base key -> its row of pair_rows_US (decode steps)
        self.prev_host: np.ndarray | None = None  # the step's previous tokens, for `record` only
        if self.pair_capacity:
            none = self.pair_capacity  # the empty slot: its token is -1, which no row has
            # each row's entry per layer slot for this step (rows.py; the empty slot where none)
            self.pair_sel_NS = torch.full((max_tokens, num_layers), none, dtype=torch.long, device=device)
            self.pair_tok_X = torch.full((none + 1,), -1, dtype=torch.long, device=device)
            self.pair_idx_XK = torch.zeros(none + 1, top_k, dtype=torch.long, device=device)
            self.pair_w_XK = torch.zeros(none + 1, top_k, dtype=torch.float32, device=device)
        # every layer's token table, stacked by layer slot: three graph inputs, not three per layer
        # (tables.py fills them in place): experts (int64), weights already scaled the way the
        # router scales its weights (float32), and which tokens have an entry (bool)
        self.experts_SVK = torch.zeros(num_layers, vocab_size, top_k, dtype=torch.long, device=device)
        self.weights_SVK = torch.zeros(num_layers, vocab_size, top_k, dtype=torch.float32, device=device)
        self.member_SV = torch.zeros(num_layers, vocab_size, dtype=torch.bool, device=device)
        # each row's code per layer slot, written by every layer, counted by the last one (`count_step`):
        # one set of counting kernels per step, not per layer (in a compiled graph each costs its
        # wrapper's Python per call)
        self.num_layers = int(num_layers)
        self.code_NS = torch.full((max_tokens, num_layers), -1, dtype=torch.int8, device=device)
        self.counts_SC = torch.zeros(num_layers, len(COUNTERS), dtype=torch.long, device=device)
        self.row_N = torch.arange(max_tokens, device=device)
        self.slot_S = torch.arange(num_layers, device=device)
        self.codes_3 = torch.arange(3, device=device)
        self.load: Any = None  # expert load and routed experts (expert_load.py `install_load`)
        self.default_on = False  # the mode of requests that do not name one (varmoe_set_enabled)
        self.layers: dict[int, "LayerVar"] = {}
        self.identity: dict[str, Any] | None = None  # model type, vocabulary, experts, top-k, fingerprint
        self.model_dir: str | None = None  # the checkpoint folder (models.py): the fingerprint reads its routers

    def count_step(self, t: int) -> None:
        """After the last MoE layer: add the step's codes of every layer to the counters (VAR-mode
        rows only), and the expert load where installed."""
        code_TS = self.code_NS[:t].long()
        hit_SC = (code_TS[..., None] == self.codes_3).sum(0)  # FAST_SAME, LEARNED, FAST_OTHER per slot
        same, learned, other = hit_SC.unbind(1)
        self.counts_SC += torch.stack([same + other, learned, same, other], 1)
        if self.load is not None:
            self.load.count_step(t, code_TS)


@dataclass
class LayerVar:
    """One MoE layer: its router, its slot in the shared state's buffers, and vLLM's scaling."""

    layer: int
    gate: nn.Module  # the learned router's linear (its weights are the fingerprint)
    renormalize: bool  # vLLM's router renormalises its top-k weights (they sum to `router_scale`)
    num_experts: int
    weight_scale: float | None  # the family's, from its adapter (`MoEAdapter.weight_scale`)
    slot: int = 0  # this layer's column in VarState.pair_sel_NS (its index among the model's MoE layers)
    # vLLM's own scaling around this router: the factor its router multiplies the top-k weights by,
    # and the factor the MoE runner multiplies the routed experts' output by afterwards (vLLM's
    # DeepSeek moves `routed_scaling_factor` there)
    router_scale: float = 1.0
    output_scale: float = 1.0
    # per-row decisions of each forward, for the exactness tests; eager mode only (a compiled
    # graph was traced with None here and never records)
    record: list | None = None

    def route(self, state: VarState, ids_T: torch.Tensor, w_TK: torch.Tensor, idx_TK: torch.Tensor,
              router_logits: torch.Tensor | None = None):
        v = state.member_SV.shape[1]
        safe_T = ids_T.long().clamp(0, v - 1)
        rows_T = state.rows_N[: ids_T.shape[0]]
        use_T = state.member_SV[self.slot][safe_T] & rows_T
        tab_idx_TK = state.experts_SVK[self.slot][safe_T].to(idx_TK.dtype)
        tab_w_TK = state.weights_SVK[self.slot][safe_T].to(w_TK.dtype)
        pair_T = None
        if state.pair_sel_NS is not None:  # fixed when the model is built: not a branch on data
            # the host chose this row's entry (a VAR row whose token has no token entry); the device
            # keeps it where the entry's token is the row's token (a host that did not know the
            # row's token serves no pair row rather than a wrong one)
            e_T = state.pair_sel_NS[: ids_T.shape[0], self.slot]
            pair_T = state.pair_tok_X[e_T] == ids_T.long()
            use_T = use_T | pair_T
            tab_idx_TK = torch.where(pair_T[:, None], state.pair_idx_XK[e_T].to(idx_TK.dtype), tab_idx_TK)
            tab_w_TK = torch.where(pair_T[:, None], state.pair_w_XK[e_T].to(w_TK.dtype), tab_w_TK)
        out_idx_TK = torch.where(use_T[:, None], tab_idx_TK, idx_TK)
        out_w_TK = torch.where(use_T[:, None], tab_w_TK, w_TK)
        same_T = _same_set(tab_idx_TK, idx_TK)
        code_T = torch.where(rows_T, torch.where(use_T, torch.where(same_T, FAST_SAME, FAST_OTHER), LEARNED), -1)
        at = (state.row_N[: ids_T.shape[0]], state.slot_S[self.slot])  # (row, layer slot) of the step's rows
        state.code_NS.index_put_(at, code_T.to(torch.int8))
        if state.load is not None:  # routed experts and expert load (expert_load.py): in place, on the device
            state.load.write(at, out_idx_TK, router_logits)
        if self.slot == state.num_layers - 1:  # fixed when the model is built: not a branch on data
            state.count_step(ids_T.shape[0])
        if self.record is not None:
            rec = {"ids": ids_T.tolist(), "fast": use_T.tolist(), "experts": out_idx_TK.tolist(),
                   "learned": idx_TK.tolist(), "weights": out_w_TK.float().tolist(), "learned_w": w_TK.float().tolist()}
            if pair_T is not None:
                prev = [] if state.prev_host is None else state.prev_host.tolist()
                rec |= {"pair": pair_T.tolist(), "prev": (prev + [-1] * ids_T.shape[0])[: ids_T.shape[0]]}
            self.record.append(rec)
        return out_w_TK.contiguous(), out_idx_TK.contiguous()


def _same_set(a_TK: torch.Tensor, b_TK: torch.Tensor) -> torch.Tensor:
    """Rows whose two top-k sets are equal: every id of one is among the other's (top-k ids within a
    row are distinct). K x K comparisons, pointwise work the compiler fuses into the layer's kernel;
    a sort would be an extern call per operand and layer."""
    return (a_TK[:, :, None] == b_TK[:, None, :]).any(2).all(1)


# The three overrides below become methods of a one-level subclass of each patched object's class
# (`_subclass`); they reach the original method through `_varmoe_base` (the class they replace).

def _embedding_forward(self, input_ids, *args, **kwargs):
    """Token embedding: remember the step's token ids for the MoE routers."""
    self._varmoe.ids = input_ids
    return self._varmoe_base.forward(self, input_ids, *args, **kwargs)


def _runner_forward(self, hidden_states, router_logits, input_ids=None, shared_experts_input=None):
    """MoE runner: hand the step's token ids to the router when the caller did not."""
    if input_ids is None:
        input_ids = self._varmoe.ids
    return self._varmoe_base.forward(self, hidden_states, router_logits, input_ids=input_ids,
                                     shared_experts_input=shared_experts_input)


def _router_compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
    """Router: the learned decision first, then table rows where VAR applies."""
    w_TK, idx_TK = self._varmoe_base._compute_routing(self, hidden_states, router_logits, indices_type,
                                                      input_ids=input_ids)
    if input_ids is None:  # inputs_embeds or a later pipeline stage: the learned router decides
        return w_TK, idx_TK
    return self._varmoe_layer.route(self._varmoe, input_ids, w_TK, idx_TK, router_logits)


def _subclass(obj: Any, method: str, fn: Any) -> None:
    """Give one object a subclass of its own class whose `method` is `fn` (one subclass per class).

    Single inheritance on purpose: CPython refuses a `__class__` swap to a class with a mixin base
    for some vLLM classes ("object layout differs")."""
    cls = type(obj)
    if getattr(cls, "_varmoe_base", None) is not None:
        return
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"Var{cls.__name__}", (cls,), {method: fn, "_varmoe_base": cls, "__module__": __name__})
        _SUBCLASSES[cls] = sub
    obj.__class__ = sub


_SUBCLASSES: dict[type, type] = {}


_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def find_moe_blocks(model: nn.Module, gate_attr: str = "gate") -> list[tuple[int, nn.Module, nn.Module]]:
    """(layer, router linear, MoE runner) of each MoE block of a vLLM model, by layer: modules with a
    router linear at `gate_attr` (the family adapter's `router_attr`: vLLM mostly keeps the Hugging
    Face names), else at `gate` (vLLM's GraniteMoE renames its `router`), and an `experts` runner
    (`FusedMoE` / `MoERunner`) that has a `router`."""
    out = []
    for name, mod in model.named_modules():
        gate, experts = getattr(mod, gate_attr, None), getattr(mod, "experts", None)
        if gate is None:
            gate = getattr(mod, "gate", None)
        m = _LAYER_RE.search(name + ".")
        if gate is not None and hasattr(experts, "router") and m is not None:
            out.append((int(m.group(1)), gate, experts))
    return sorted(out, key=lambda b: b[0])


def find_embedding(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", model)
    emb = getattr(inner, "embed_tokens", None)
    if emb is None:
        emb = getattr(inner, "embedding", None)  # GPT-OSS names it `embedding`
    if emb is None:
        raise ValueError(f"{type(model).__name__}: no model.embed_tokens; VAR needs the token ids")
    return emb


def install_var(model: nn.Module, vocab_size: int, top_k: int, max_tokens: int, pair_capacity: int = 0,
                weight_scale: float | None = 1.0, gate_attr: str = "gate") -> VarState:
    """Patch the embedding, MoE runners and routers of `model` (before compilation); empty tables.
    `max_tokens`: the most tokens one forward carries (the scheduler's max_num_batched_tokens);
    `pair_capacity`: the most (previous, token) entries, all layers together, a tables file may hold
    (0: no pair tier); `weight_scale`, `gate_attr`: the family adapter's `weight_scale` and
    `router_attr` (models.py passes them)."""
    blocks = find_moe_blocks(model, gate_attr)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE blocks with a gate and a FusedMoE runner")
    device = blocks[0][1].weight.device
    state = VarState(device, max_tokens, pair_capacity, top_k, num_layers=len(blocks), vocab_size=vocab_size)
    emb = find_embedding(model)
    object.__setattr__(emb, "_varmoe", state)  # a plain attribute, not a submodule
    _subclass(emb, "forward", _embedding_forward)
    for slot, (layer, gate, runner) in enumerate(blocks):
        router = runner.router
        lv = LayerVar(layer, gate, bool(getattr(router, "renormalize", True)), int(gate.weight.shape[0]),
                      weight_scale, slot, float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
                      float(getattr(runner, "routed_scaling_factor", 1.0) or 1.0))
        state.layers[layer] = lv
        object.__setattr__(runner, "_varmoe", state)
        _subclass(runner, "forward", _runner_forward)
        router._varmoe = state
        router._varmoe_layer = lv
        _subclass(router, "_compute_routing", _router_compute_routing)
    model._varmoe_state = state
    return state
