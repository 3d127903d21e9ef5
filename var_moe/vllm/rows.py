"""Per-step row data on vLLM: which token rows belong to VAR-mode requests, and their (previous, token) entries.

A request names its mode in `SamplingParams(extra_args={"varmoe_var": True|False})` (vLLM's
OpenAI server: `"vllm_xargs"`); one that names none runs in the worker's default mode
(`varmoe_set_enabled`). vLLM lays a step's tokens out request by request in the runner's input
batch order, so the per-token mode is the requests' modes repeated by their scheduled token counts,
copied once into `VarState.rows_N` before the forward: baseline and VAR requests share a batch.

With (previous, token) entries loaded, the same hook finds each VAR row's entry for all layers at
once, from the runner's token table: `pair_entries` with one numpy `searchsorted` (the host twin of
`served.find_pairs`; numpy because torch's per-op overhead exceeds the work on a step's few rows),
or, for a decode step of up to `DICT_REQUESTS` requests, a dict lookup per request
(`decode_entries`). The indices go to the device in one copy (`VarState.pair_sel_NS`). On the CPU
build the tokens are on the host when the step runs (vLLM turns async scheduling off there); under
async scheduling (GPU builds) sampled tokens are a placeholder -1 on the host, so such rows find no
entry and the learned router routes them (the device refuses a row whose host token differs,
routing.py), and the host's per-request counts would overstate pair rows.

The hook (`install_rows`) needs vLLM's V1 model runner, which `engine_kwargs` selects.
Test: `pytest tests/test_served_decision.py tests/test_vllm_routing.py tests/vllm_engine/`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..var.served import pair_key, pair_serves, split_key
from .routing import VarState, _subclass

MODE_KEY = "varmoe_var"  # the key of SamplingParams.extra_args that pins a request's mode
DICT_REQUESTS = 16  # decode steps of at most this many requests look their pairs up in a dict


def request_modes(req_ids: list[str], requests: dict[str, Any], default: bool) -> np.ndarray:
    """VAR mode of each request, in batch order (a loop over requests, not tokens)."""
    out = np.full(len(req_ids), default, dtype=bool)
    for i, rid in enumerate(req_ids):
        params = getattr(requests.get(rid), "sampling_params", None)
        extra = getattr(params, "extra_args", None)
        if extra and extra.get(MODE_KEY) is not None:
            out[i] = bool(extra[MODE_KEY])
    return out


def token_rows(modes_R: np.ndarray, tokens_R: np.ndarray) -> np.ndarray:
    """Per-token modes of one step: each request's mode over its scheduled tokens."""
    return np.repeat(modes_R, tokens_R)


def step_tokens(token_ids_RS: np.ndarray, computed_R: np.ndarray, tokens_R: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """(prev_T, tok_T), int64: each row's previous token and token in one step. Request r's row j
    sits at position computed_R[r] + j and reads token_ids_RS[r, position - 1] (-1 at position 0)
    and token_ids_RS[r, position]. `token_ids_RS`: the runner's token table (requests in batch
    order x positions); `computed_R`: tokens each request computed before this step; `tokens_R`:
    tokens it has in it."""
    tokens_R = np.asarray(tokens_R, dtype=np.int64)
    computed_R = np.asarray(computed_R, dtype=np.int64)
    n = int(tokens_R.sum())
    if n == tokens_R.shape[0]:  # one row per request (decode steps): row r is request r at computed_R[r]
        req_T, pos_T = np.arange(n), computed_R
    else:
        req_T = np.repeat(np.arange(tokens_R.shape[0]), tokens_R)
        start_R = np.cumsum(tokens_R) - tokens_R  # first row of each request in the step
        pos_T = computed_R[req_T] + np.arange(n) - start_R[req_T]
    # int64: previous * V + token overflows int32 for large vocabularies
    prev_T = np.where(pos_T > 0, token_ids_RS[req_T, pos_T - 1], -1).astype(np.int64)
    return prev_T, token_ids_RS[req_T, pos_T].astype(np.int64)


def index_pairs(state: VarState, keys_X: np.ndarray, member_VS: np.ndarray) -> None:
    """Index the loaded pair entries on the host for the per-step lookups: `keys_X` sorted keys
    slot * V**2 + previous * V + token (entry i at index i), `member_VS` each slot's token entries."""
    v, s = member_VS.shape
    slot_X, prev_X, tok_X = split_key(np.asarray(keys_X, dtype=np.int64), v)
    base_X = pair_key(0, prev_X, tok_X, v)
    bases_U, u_X = np.unique(base_X, return_inverse=True)
    rows_US = np.full((bases_U.size, s), state.pair_capacity, dtype=np.int64)
    served_X = pair_serves(member_VS[tok_X, slot_X], True)
    rows_US[u_X[served_X], slot_X[served_X]] = np.flatnonzero(served_X)
    state.pair_entries, state.pair_vocab = int(base_X.size), int(v)
    state.pair_bases_U, state.pair_rows_US = bases_U, rows_US
    state.pair_rows_host = dict(zip(bases_U.tolist(), rows_US))


def pair_entries(state: VarState, rows_T: np.ndarray, prev_T: np.ndarray, tok_T: np.ndarray) -> np.ndarray | None:
    """[T, S] int64: each row's (previous, token) entry in each layer slot, for VAR rows whose token
    has no token entry in that layer (token entries win), else the empty slot; None when no row of
    the step has one. One searchsorted over the distinct (previous, token) of all slots."""
    v, bases_U = state.pair_vocab, state.pair_bases_U
    if bases_U.size == 0:
        return None
    c = np.flatnonzero(rows_T & ((prev_T | tok_T) >= 0) & (np.maximum(prev_T, tok_T) < v))
    if c.size == 0:
        return None
    base_C = pair_key(0, prev_T[c], tok_T[c], v)
    j_C = np.minimum(np.searchsorted(bases_U, base_C), bases_U.size - 1)
    hit_C = bases_U[j_C] == base_C
    if not hit_C.any():
        return None
    out = np.full((rows_T.shape[0], state.pair_rows_US.shape[1]), state.pair_capacity, dtype=np.int64)
    out[c[hit_C]] = state.pair_rows_US[j_C[hit_C]]
    return out


def decode_entries(state: VarState, modes_R: np.ndarray, token_ids_RS: np.ndarray, computed_R: np.ndarray
                   ) -> tuple[np.ndarray | None, np.ndarray]:
    """(sel_TS or None, prev_T): `pair_entries` and `step_tokens`' previous tokens for a decode step
    (one row per request, row r = request r at position computed_R[r]). Per request, two reads and a
    dict lookup: on a step's few rows, right after a forward has evicted the caches, that touches
    less cold code than `step_tokens` + `pair_entries`' numpy calls (measured: docs/BENCHMARKS.md)."""
    v, table, n = state.pair_vocab, state.pair_rows_host, modes_R.shape[0]
    prev_T = np.full(n, -1, dtype=np.int64)
    out = None  # made at the first hit: most decode steps have none
    for r, (on, pos) in enumerate(zip(modes_R.tolist(), computed_R.tolist())):  # requests, not tokens
        if pos <= 0:  # a sequence start: no previous token
            continue
        prev, tok = int(token_ids_RS[r, pos - 1]), int(token_ids_RS[r, pos])
        prev_T[r] = prev
        row = table.get(pair_key(0, prev, tok, v)) if on and 0 <= prev < v and 0 <= tok < v else None
        if row is not None:
            if out is None:
                out = np.full((n, state.pair_rows_US.shape[1]), state.pair_capacity, dtype=np.int64)
            out[r] = row
    return out, prev_T


class RowWriter:
    """Writes a step's per-token modes (and pair entries, with a pair tier) into the device
    buffers: directly on the CPU build, else through pinned staging copies. Host buffers are written
    through numpy views (a numpy slice assignment costs a fraction of a torch one), and only the
    rows a step needs are touched: a high-water mark says how far earlier steps wrote."""

    def __init__(self, state: VarState, staged: bool | None = None):
        """`staged`: write host staging buffers and copy them over (default: unless the buffers are
        host memory; tests force it on the CPU to check the path GPUs take)."""
        self.state = state
        dev = state.rows_N.device
        cuda = dev.type == "cuda"
        self.direct = dev.type == "cpu" if staged is None else not staged
        self.staging = state.rows_N if self.direct else torch.zeros_like(state.rows_N, device="cpu", pin_memory=cuda)
        self.rows_np = self.staging.numpy()
        self.rows_hi = self.rows_np.shape[0]  # rows that may be True (all, until the first write)
        self.sel_staging = None
        if state.pair_sel_NS is not None:
            self.sel_staging = (state.pair_sel_NS if self.direct else
                                torch.full_like(state.pair_sel_NS, state.pair_capacity, device="cpu", pin_memory=cuda))
            self.sel_np = self.sel_staging.numpy()
        self.sel_rows = 0  # rows of pair_sel_NS that may hold an entry (the others hold the empty slot)
        self.done = torch.cuda.Event() if cuda else None

    def write(self, rows_T: np.ndarray, sel_TS: np.ndarray | None = None, prev_T: np.ndarray | None = None) -> None:
        n = rows_T.shape[0]
        if n > self.rows_np.shape[0]:
            raise RuntimeError(f"a step of {n} tokens exceeds the VAR row buffer ({self.rows_np.shape[0]})")
        self.state.prev_host = prev_T
        if self.done is not None:
            self.done.synchronize()  # the previous step's copies have left the staging buffers
        self.rows_np[:n] = rows_T
        if self.rows_hi > n:  # padding rows (CUDA graphs) stay baseline
            self.rows_np[n:self.rows_hi] = False
        rows_m, self.rows_hi = max(self.rows_hi, n), n
        m = 0  # rows of pair_sel_NS to copy to the device
        if self.sel_staging is not None:
            k = n if sel_TS is not None else 0  # rows this step fills
            if k:
                self.sel_np[:k] = sel_TS
            if self.sel_rows > k:  # rows an earlier step filled go back to the empty slot
                self.sel_np[k:self.sel_rows] = self.state.pair_capacity
            m, self.sel_rows = max(self.sel_rows, k), k
        if self.direct:
            return
        self.state.rows_N[:rows_m].copy_(self.staging[:rows_m], non_blocking=True)  # ordered before the forward
        if m:
            self.state.pair_sel_NS[:m].copy_(self.sel_staging[:m], non_blocking=True)
        if self.done is not None:
            self.done.record()


def _runner_prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
    """V1 model runner: vLLM's input preparation, then this step's per-token VAR modes (and pair
    entries, with (previous, token) entries loaded)."""
    out = self._varmoe_base._prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
    state = self._varmoe
    n_req = len(num_scheduled_tokens)
    modes_R = request_modes(self.input_batch.req_ids[:n_req], self.requests, state.default_on)
    tokens_R = np.asarray(num_scheduled_tokens)
    rows_T = token_rows(modes_R, tokens_R)
    sel_TS = prev_T = None
    if state.pair_entries and modes_R.any():
        batch = self.input_batch
        if rows_T.shape[0] == n_req <= DICT_REQUESTS:  # a small decode step: one row per request
            sel_TS, prev_T = decode_entries(state, modes_R, batch.token_ids_cpu, batch.num_computed_tokens_cpu[:n_req])
        else:
            prev_T, tok_T = step_tokens(batch.token_ids_cpu[:n_req], batch.num_computed_tokens_cpu[:n_req], tokens_R)
            sel_TS = pair_entries(state, rows_T, prev_T, tok_T)
    self._varmoe_rows.write(rows_T, sel_TS, prev_T)
    if state.load is not None:  # expert load's real rows and routed-experts bookkeeping (expert_load.py)
        state.load.on_step(self, n_req, tokens_R)
    return out


def install_rows(runner: Any, state: VarState) -> None:
    """Hook `runner` (a vLLM V1 GPUModelRunner or a subclass such as the CPU runner); idempotent."""
    if getattr(type(runner), "_varmoe_base", None) is not None:
        return
    if not (hasattr(runner, "_prepare_inputs") and hasattr(runner, "input_batch") and hasattr(runner, "requests")):
        raise RuntimeError(
            f"per-request VAR modes need vLLM's V1 model runner; this worker runs {type(runner).__name__}. "
            "Start the engine with VLLM_USE_V2_MODEL_RUNNER=0 (var_moe.vllm.engine_kwargs sets it when unset)")
    object.__setattr__(runner, "_varmoe", state)
    object.__setattr__(runner, "_varmoe_rows", RowWriter(state))
    _subclass(runner, "_prepare_inputs", _runner_prepare_inputs)
