"""Agreement of VAR table rows with vLLM's learned router, measured by the engine itself.

`table_agreement(engine, token_lists)` sends each token list through an `LLMEngine` as a VAR-mode
request that generates one token, and returns per MoE layer (table rows whose set equals the
learned set, table rows) from the workers' audit counters (routing.py computes the learned
decision for every row anyway and counts each table row as agreeing or not). This is the served
engine's own routing, in its own dtype and kernels, so a server started in another dtype than the
tables were certified in can measure them before it serves (var_moe.var.served_dtype judges the
counts). The counters are reset afterwards, so the server's metrics start at zero.
Test: `pytest tests/vllm_engine/test_vllm_default_serve.py` (vLLM environment).
"""

from __future__ import annotations

from itertools import count
from typing import Any

_ids = count()


def _audit(engine: Any) -> dict[int, tuple[int, int]]:
    from .routing import AGREE, DISAGREE

    merged: dict[int, tuple[int, int]] = {}
    for worker in engine.collective_rpc("varmoe_counts"):
        for layer, c in worker.items():  # tensor-parallel ranks count the same rows: first one wins
            merged.setdefault(int(layer), (int(c[AGREE]), int(c[AGREE]) + int(c[DISAGREE])))
    return merged


def table_agreement(engine: Any, token_lists: list[list[int]], max_steps: int = 100_000) -> dict[int, tuple[int, int]]:
    """{layer: (agreeing table rows, table rows)} over the prompts' tokens, in VAR mode."""
    from vllm import SamplingParams

    from .rows import MODE_KEY

    before = _audit(engine)
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
    after = _audit(engine)
    engine.collective_rpc("varmoe_reset_counts")
    return {l: (a - before.get(l, (0, 0))[0], t - before.get(l, (0, 0))[1]) for l, (a, t) in after.items()}
