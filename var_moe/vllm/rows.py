"""Per-request VAR modes on vLLM: each step, mark which token rows belong to VAR-mode requests.

A request names its mode in its sampling parameters, `SamplingParams(extra_args={"varmoe_var":
True|False})` (vLLM's OpenAI server takes the same through `"vllm_xargs"`); a request that names
none runs in the worker's default mode (`varmoe_set_enabled`). vLLM lays a step's tokens out
request by request, in the order of the model runner's input batch, so the per-token mode is the
requests' modes repeated by their scheduled token counts: `np.repeat` over requests (no loop
over tokens), one host-to-device copy into `VarState.rows_N` before the forward. Baseline and VAR
requests therefore share a batch, and each row is routed in its own request's mode.

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


class RowWriter:
    """Writes a step's per-token modes into the device buffer (a pinned staging copy on CUDA)."""

    def __init__(self, state: VarState):
        self.state = state
        dev = state.rows_N.device
        self.staging = torch.zeros_like(state.rows_N, device="cpu", pin_memory=dev.type == "cuda")
        self.done = torch.cuda.Event() if dev.type == "cuda" else None
        self.cpu = dev.type == "cpu"

    def write(self, rows_T: np.ndarray) -> None:
        n = rows_T.shape[0]
        if n > self.state.rows_N.shape[0]:
            raise RuntimeError(f"a step of {n} tokens exceeds the VAR row buffer ({self.state.rows_N.shape[0]})")
        if self.cpu:  # the buffer is host memory: write it directly
            self.state.rows_N[:n] = torch.from_numpy(rows_T)
            self.state.rows_N[n:] = False
            return
        if self.done is not None:
            self.done.synchronize()  # the previous step's copy has left the staging buffer
        self.staging[:n] = torch.from_numpy(rows_T)
        self.staging[n:] = False
        self.state.rows_N.copy_(self.staging, non_blocking=True)  # ordered before the forward on the stream
        if self.done is not None:
            self.done.record()


def _runner_prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
    """V1 model runner: vLLM's input preparation, then this step's per-token VAR modes."""
    out = self._varmoe_base._prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
    n_req = len(num_scheduled_tokens)
    req_ids = self.input_batch.req_ids[:n_req]
    modes_R = request_modes(req_ids, self.requests, self._varmoe.default_on)
    self._varmoe_rows.write(token_rows(modes_R, np.asarray(num_scheduled_tokens)))
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
