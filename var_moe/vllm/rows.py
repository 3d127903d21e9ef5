"""Per-step row data on vLLM: which token rows belong to VAR-mode requests, and each row's previous token.

A request names its mode in its sampling parameters, `SamplingParams(extra_args={"varmoe_var":
True|False})` (vLLM's OpenAI server takes the same through `"vllm_xargs"`); a request that names
none runs in the worker's default mode (`varmoe_set_enabled`). vLLM lays a step's tokens out
request by request, in the order of the model runner's input batch, so the per-token mode is the
requests' modes repeated by their scheduled token counts: `np.repeat` over requests (no loop
over tokens), one host-to-device copy into `VarState.rows_N` before the forward. Baseline and VAR
requests therefore share a batch, and each row is routed in its own request's mode.

With a pair tier (`VarState.prev_N`), the same hook writes each row's previous token, for the
(previous, token) entries: the row at position p of request r reads r's token at p - 1 from the
runner's `input_batch.token_ids_cpu`, with positions computed as vLLM's `_prepare_inputs` computes
them (`num_computed_tokens_cpu[request] + position in the step`); -1 at p == 0 and in padding
slots (`previous_tokens`, one gather, no loop over tokens). The token at p - 1 is on the host when
the step runs on the CPU build: the prompt is written there when a request is added (so chunked
prefill and prefix-cache hits read it), and each sampled token is written by the runner's
bookkeeping right after the step that sampled it, before the next step is prepared (vLLM's CPU
platform turns async scheduling off). Under async scheduling (GPU builds) the host table holds a
placeholder -1 for sampled tokens (vLLM's own `_prepare_lookback_token_ids` says so): a row whose
previous token was sampled then reads -1 and is never served from a pair entry (the learned router
routes it, never a wrong entry), and the host's per-request counts would overstate pair rows.

The hook is a one-level subclass of the runner's class (as routing.py patches modules) whose
`_prepare_inputs` calls vLLM's and then writes the rows. It needs vLLM's V1 model runner (the
one the CPU build uses; on GPUs `engine_kwargs` selects it): the V2 runner keeps no per-request
sampling parameters to read, and is refused with a message rather than served with wrong modes.
Test: `pytest tests/vllm_engine/` (the server test mixes pinned modes in one batch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .routing import VarState, _subclass

MODE_KEY = "varmoe_var"  # the key of SamplingParams.extra_args that pins a request's mode


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


def previous_tokens(token_ids_RS: np.ndarray, computed_R: np.ndarray, tokens_R: np.ndarray) -> np.ndarray:
    """Each row's previous token in one step (int64): request r's row j sits at position
    computed_R[r] + j and reads token_ids_RS[r, position - 1]; -1 at position 0.
    `token_ids_RS`: the runner's token table (requests in batch order x positions);
    `computed_R`: tokens each request computed before this step; `tokens_R`: tokens it has in it."""
    tokens_R = np.asarray(tokens_R, dtype=np.int64)
    req_T = np.repeat(np.arange(tokens_R.shape[0]), tokens_R)
    start_R = np.cumsum(tokens_R) - tokens_R  # first row of each request in the step
    pos_T = np.asarray(computed_R, dtype=np.int64)[req_T] + np.arange(req_T.shape[0]) - start_R[req_T]
    prev_T = token_ids_RS[req_T, np.maximum(pos_T - 1, 0)].astype(np.int64)
    return np.where(pos_T > 0, prev_T, -1)


class RowWriter:
    """Writes a step's per-token modes (and previous tokens, with a pair tier) into the device
    buffers (through pinned staging copies on CUDA)."""

    def __init__(self, state: VarState):
        self.state = state
        dev = state.rows_N.device
        cuda = dev.type == "cuda"
        self.staging = torch.zeros_like(state.rows_N, device="cpu", pin_memory=cuda)
        self.prev_staging = (torch.zeros_like(state.prev_N, device="cpu", pin_memory=cuda)
                             if state.prev_N is not None else None)
        self.done = torch.cuda.Event() if cuda else None
        self.cpu = dev.type == "cpu"

    def write(self, rows_T: np.ndarray, prev_T: np.ndarray | None = None) -> None:
        n = rows_T.shape[0]
        if n > self.state.rows_N.shape[0]:
            raise RuntimeError(f"a step of {n} tokens exceeds the VAR row buffer ({self.state.rows_N.shape[0]})")
        pairs = self.state.prev_N is not None and prev_T is not None
        if self.cpu:  # the buffers are host memory: write them directly
            self.state.rows_N[:n] = torch.from_numpy(rows_T)
            self.state.rows_N[n:] = False
            if pairs:
                self.state.prev_N[:n] = torch.from_numpy(prev_T)
                self.state.prev_N[n:] = -1
            return
        if self.done is not None:
            self.done.synchronize()  # the previous step's copies have left the staging buffers
        self.staging[:n] = torch.from_numpy(rows_T)
        self.staging[n:] = False
        self.state.rows_N.copy_(self.staging, non_blocking=True)  # ordered before the forward on the stream
        if pairs:
            self.prev_staging[:n] = torch.from_numpy(prev_T)
            self.prev_staging[n:] = -1
            self.state.prev_N.copy_(self.prev_staging, non_blocking=True)
        if self.done is not None:
            self.done.record()


def _runner_prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
    """V1 model runner: vLLM's input preparation, then this step's per-token VAR modes (and
    previous tokens, with a pair tier)."""
    out = self._varmoe_base._prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
    n_req = len(num_scheduled_tokens)
    req_ids = self.input_batch.req_ids[:n_req]
    modes_R = request_modes(req_ids, self.requests, self._varmoe.default_on)
    tokens_R = np.asarray(num_scheduled_tokens)
    prev_T = None
    if self._varmoe.prev_N is not None:
        batch = self.input_batch
        prev_T = previous_tokens(batch.token_ids_cpu[:n_req], batch.num_computed_tokens_cpu[:n_req], tokens_R)
    self._varmoe_rows.write(token_rows(modes_R, tokens_R), prev_T)
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
