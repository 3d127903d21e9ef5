"""Check modules of `benchmarks/gpu_check.py` (`make gpu-check`) and what they share.

A check module defines `run(ctx: GPUContext) -> list[dict]`; each dict is one table row made with
`row(check, metric, value, expect, ok, note)`:
- `value`  the measured number (or a short string), None when nothing was measured;
- `expect` what a healthy run gives, in words (e.g. ">= 0.90", "equal");
- `ok`     True / False against `expect`, or None for an informational or skipped row.
Modules must import without CUDA (the runner imports them on any machine) and put any files
under `ctx.out_dir`. Add one by dropping a file here; the runner finds it by name.
Test: `pytest tests/test_gpu_check.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GPUContext:
    model: str  # model folder or hub id (default: the reference model)
    device: str  # "cuda" normally; "cpu" only to test the checks' own code
    num_samples: int  # test-split sequences per measurement
    out_dir: Path  # per-check files
    max_length: int = 256

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def row(check: str, metric: str, value: Any, expect: str, ok: bool | None, note: str = "") -> dict:
    return {"check": check, "metric": metric, "value": value, "expect": expect, "ok": ok, "note": note}


def sample_batches(ctx: GPUContext, tokenizer: Any, batch_size: int = 8) -> list[tuple[Any, Any]]:
    """The same padded test-split batches for every model a check compares."""
    from var_moe.corpus import iter_batches

    return list(iter_batches(tokenizer, "stdlib", "test", ctx.max_length, batch_size, ctx.num_samples))


def perplexity(model: Any, batches: list[tuple[Any, Any]]) -> float:
    """Perplexity over `batches` (padding masked; log-softmax in float32)."""
    import math

    from var_moe.perplexity import sequence_nll

    total, count = 0.0, 0
    for ids, mask in batches:
        nll, n = sequence_nll(model, ids, mask)
        total, count = total + float(nll.sum()), count + int(n.sum())
    return math.exp(total / max(1, count))


def free_memory() -> None:
    """Give the GPU memory of dropped models back before the next load (callers `del` theirs first)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
