"""Expert load and routed experts inside vLLM's compiled model: device buffers the graph updates in
place, and the worker-side bookkeeping that hands each request its experts.

`install_load` puts a `VllmLoad` on the shared `VarState` at model construction (models.py). Each
MoE router (routing.py `LayerVar.route`) calls `write` with the experts it returns and its logits
(`routed_NSK`, `entropy_NS`; each row's tier is its code in `VarState.code_NS`); after the last MoE
layer `count_step` adds every layer's rows to the counters at once (var_moe/expert_load.py `ExpertLoad`;
per tier: fast = table rows of VAR-mode requests, learned = their other rows; baseline rows count
in the totals only). Rows are written with `index_put_` at (row, slot): inductor compiles a slice
assignment `[:t, slot] = ...` into a rewrite of the whole buffer per layer on the CPU, an indexed
write into a scatter of the t rows. Padding rows (CUDA graphs) are masked with `valid_N`, which
`on_step` (the runner hook in rows.py) writes before each forward.

Nothing here reads the device during a step: the counters are copied when `/metrics` asks (`read`),
and routed rows only for requests that asked for them (`SamplingParams.extra_args
{"varmoe_routed": key}`), one copy per step, filed by each row's position in its request (a request
recomputed after preemption overwrites its rows; the server gives such requests a cache salt of
their own, so a prefix-cache hit skips none of their prompt rows).

Shapes: N row-buffer slots (the most tokens of one step), S MoE layer slots, K top-k, E experts.
Test: `pytest tests/test_vllm_routing.py tests/vllm_engine/test_vllm_expert_load.py` (the second: vLLM environment).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..expert_load import ExpertLoad, LoadReading
from ..var.served import TIERS
from .routing import FAST_SAME, LEARNED, tier_of

assert (FAST_SAME, LEARNED) == (TIERS.index("fast"), TIERS.index("learned"))  # what tier_of relies on

ROUTED_KEY = "varmoe_routed"  # SamplingParams.extra_args key: return this request's routed experts


class VllmLoad:
    def __init__(self, code_NS: torch.Tensor, num_experts: int, top_k: int, counting: bool = True):
        device = code_NS.device
        max_tokens, num_layers = code_NS.shape
        self.counting = bool(counting)  # fixed when the model is built: not a branch on data
        self.counter = ExpertLoad(num_layers, num_experts, device, tiers=TIERS)
        self.num_experts, self.top_k, self.num_layers = num_experts, top_k, num_layers
        # False until the runner hook marks a step's rows: vLLM's start-up dummy forwards count nothing
        self.valid_N = torch.zeros(max_tokens, dtype=torch.bool, device=device)
        self.valid_hi = 0  # rows of valid_N that may be True
        self.routed_NSK = torch.zeros(max_tokens, num_layers, top_k, dtype=torch.int16, device=device)
        self.entropy_NS = torch.zeros(max_tokens, num_layers, dtype=torch.float32, device=device) if counting else None
        self.code_NS = code_NS  # the VarState's per-row codes (routing.py): each row's tier
        # host bookkeeping: the last step's rows of asking requests, and each request's rows so far
        self._pending: tuple[int, list[tuple[str, int, int, int]]] | None = None
        self._rows: dict[str, np.ndarray] = {}
        self._tiers: dict[str, np.ndarray] = {}
        self._lengths: dict[str, int] = {}

    # -- inside the compiled forward (tensor ops on fixed buffers only) --------------------------
    def write(self, at: tuple[torch.Tensor, torch.Tensor], idx_TK: torch.Tensor, logits_TE: torch.Tensor | None) -> None:
        """One layer: its experts per row, and its routing entropy, at (row, layer slot)."""
        self.routed_NSK.index_put_(at, idx_TK.to(torch.int16))
        if self.counting:  # fixed when the model is built: not a branch on data
            t = idx_TK.shape[0]
            h_T = torch.zeros(t, device=idx_TK.device) if logits_TE is None else ExpertLoad.entropy_of_logits(logits_TE.reshape(t, -1))
            self.entropy_NS.index_put_(at, h_T)

    def count_step(self, t: int, code_TS: torch.Tensor) -> None:
        """After the last MoE layer: every layer's rows into the counters at once."""
        if self.counting:
            self.counter.count_forward(self.routed_NSK[:t].transpose(0, 1), self.entropy_NS[:t].T, self.valid_N[:t],
                                       tier_of(code_TS).T)

    # -- worker host side --------------------------------------------------------------------------
    def on_step(self, runner: Any, n_req: int, tokens_R: np.ndarray) -> None:
        """Before a forward: file the previous step's asked-for rows, mark this step's real rows,
        and note which of its rows asking requests own (a loop over requests, not tokens)."""
        self.flush()
        n = int(np.asarray(tokens_R).sum())
        self.valid_N[:n] = True
        if self.valid_hi > n:
            self.valid_N[n:self.valid_hi] = False
        self.valid_hi = n
        batch, requests = runner.input_batch, runner.requests
        asking = []
        start = 0
        for r, rid in enumerate(batch.req_ids[:n_req]):
            count = int(tokens_R[r])
            params = getattr(requests.get(rid), "sampling_params", None)
            extra = getattr(params, "extra_args", None)
            key = extra.get(ROUTED_KEY) if extra else None
            if key is not None:
                asking.append((str(key), start, count, int(batch.num_computed_tokens_cpu[r])))
            start += count
        self._pending = (n, asking) if asking else None

    def flush(self) -> None:
        """Copy the last forward's rows of asking requests to the host (one copy), by position."""
        if self._pending is None:
            return
        n, asking = self._pending
        self._pending = None
        rows_NSK = self.routed_NSK[:n].cpu().numpy()
        code_NS = self.code_NS[:n].cpu().numpy()
        tier_NS = tier_of(code_NS.astype(np.int64)).astype(np.int8)
        for key, start, count, pos in asking:
            need = pos + count
            buf = _grown(self._rows, key, need, (self.num_layers, self.top_k), np.int16)
            buf[pos:need] = rows_NSK[start:start + count]
            _grown(self._tiers, key, need, (self.num_layers,), np.int8)[pos:need] = tier_NS[start:start + count]
            self._lengths[key] = max(self._lengths.get(key, 0), need)

    def take_routed(self, keys: list[str], finished: list[str]) -> dict[str, dict[str, list]]:
        """Each request's rows so far: {"experts": [positions][layers][k], "tiers": [positions][layers]
        (0 fast, 1 learned, -1 a baseline-mode row)}; finished ones are forgotten."""
        self.flush()
        out = {}
        for key in keys:
            n = self._lengths.get(key, 0)
            buf, tiers = self._rows.get(key), self._tiers.get(key)
            out[key] = {"experts": [] if buf is None else buf[:n].tolist(),
                        "tiers": [] if tiers is None else tiers[:n].tolist()}
        for key in finished:
            self._rows.pop(key, None)
            self._tiers.pop(key, None)
            self._lengths.pop(key, None)
        return out

    def read(self) -> dict[str, Any]:
        """The cumulative expert-load counters as plain lists (for collective_rpc)."""
        return {k: None if v is None else v.tolist() for k, v in vars(self.counter.read()).items()}


def _grown(store: dict[str, np.ndarray], key: str, need: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """The request's host array, grown (doubling) to hold `need` positions."""
    buf = store.get(key)
    if buf is None or buf.shape[0] < need:
        grown = np.zeros((max(need, 2 * (0 if buf is None else buf.shape[0]), 16), *shape), dtype=dtype)
        if buf is not None:
            grown[: buf.shape[0]] = buf
        store[key] = buf = grown
    return buf


def install_load(state: Any, num_experts: int, top_k: int, counting: bool = True) -> VllmLoad:
    """Give an installed `VarState` its expert-load buffers (at model construction, before compiling);
    `counting` False keeps only the routed-experts rows."""
    state.load = VllmLoad(state.code_NS, int(num_experts), int(top_k), counting)
    return state.load


def reading_from(reply: dict[str, Any]) -> LoadReading:
    """A `LoadReading` from one worker's `read()` reply (counts int64, entropy float64)."""
    return LoadReading(**{k: None if v is None else np.asarray(v, dtype=np.float64 if k == "entropy_L" else np.int64)
                          for k, v in reply.items()})
