"""The workers' VAR counters, and the agreement of table rows with vLLM's learned router measured by them.

`table_agreement(engine, token_lists)` sends each token list through an `LLMEngine` as a VAR-mode
request that generates one token, and counts per MoE layer the table rows whose set equals the
learned set: the served engine's own routing, in its own dtype and kernels, so a server started in
another dtype than the tables were certified in can measure them before it serves
(var_moe.var.served_dtype judges the counts). The counters are reset afterwards, so the server's
metrics start at zero.
Test: `pytest tests/test_vllm_routing.py tests/vllm_engine/test_vllm_default_serve.py` (the second: vLLM environment).
"""

from __future__ import annotations

from itertools import count
from typing import Any

_ids = count()


def worker_counts(engine: Any) -> dict[int, list[int]]:
    """Each MoE layer's [fast, learned, agree, disagree] counters (extension.py `varmoe_counts`).
    Tensor-parallel ranks route the same rows with the same replicated gate, so their counters are
    equal (the vLLM suite checks it): a layer is read from the first worker that holds it, and
    workers that hold other layers (pipeline stages) add theirs."""
    merged: dict[int, list[int]] = {}
    for worker in engine.collective_rpc("varmoe_counts"):
        for layer, c in worker.items():
            merged.setdefault(int(layer), [int(v) for v in c])
    return merged


def table_agreement(engine: Any, token_lists: list[list[int]], max_steps: int = 100_000) -> dict[int, tuple[int, int]]:
    """{layer: (agreeing table rows, table rows)} over the prompts' tokens, in VAR mode."""
    from vllm import SamplingParams

    from .routing import AGREE, DISAGREE
    from .rows import MODE_KEY

    before = worker_counts(engine)
    for ids in token_lists:
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args={MODE_KEY: True})
        engine.add_request(f"varmoe-dtype-check-{next(_ids)}", {"prompt_token_ids": list(ids), "cache_salt": "check"},
                           params)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"the dtype check did not finish in {max_steps} engine steps")
    after = worker_counts(engine)
    engine.collective_rpc("varmoe_reset_counts")
    out = {}
    for layer, c in after.items():
        b = before.get(layer, [0] * len(c))
        agree = c[AGREE] - b[AGREE]
        out[layer] = (agree, agree + c[DISAGREE] - b[DISAGREE])
    return out
