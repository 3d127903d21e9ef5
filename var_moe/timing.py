"""Interleaved timing: the one way this project compares the speed of variants on a noisy machine.

Variants take turns step by step, in an order rotated every turn (`rotated`), so the machine's
drifting load hits each alike; a warm-up runs first and is not kept. A step is whatever one timed
unit is: a batch forward (evaluation, sweep), a decode step, a whole benchmark run.

    times = interleaved({"base": Variant(run_base, around=wrapper.suspended), "var": Variant(run_var)},
                        steps=len(batches), repeats=3, warmup=1)
    times["var"][r][i]   # seconds of variant "var", repeat r, step i

`Variant.around` is an untimed context entered around each timed run (e.g. taking VAR out for the
baseline), so switching costs nothing to either side. On CUDA every timed run is bracketed by a
device synchronisation. Runs that cannot be a call per step (servers under load) use `rotated`
alone. Test: `pytest tests/test_timing.py`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Sequence, TypeVar

import torch

T = TypeVar("T")


def rotated(names: Sequence[T], turn: int) -> list[T]:
    """`names` in the order of turn `turn`: rotated by one each turn, so each goes first equally often."""
    k = turn % len(names)
    return list(names[k:]) + list(names[:k])


def sync(device: Any = None) -> None:
    """Wait for queued device work (CUDA runs asynchronously; CPU work is done when the call returns)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Variant:
    run: Callable[[int], Any]  # runs step i (timed)
    around: Callable[[], ContextManager[Any]] = field(default=contextlib.nullcontext)  # untimed, around each run


def time_call(fn: Callable[[], Any], device: Any = None) -> float:
    """Wall seconds of one call, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(variants: Mapping[str, Variant], steps: int, repeats: int, warmup: int = 1,
                before_repeat: Callable[[], Any] | None = None, device: Any = None) -> dict[str, list[list[float]]]:
    """Seconds per variant, repeat and step: `out[name][repeat][step]`. Step i of every variant runs
    before step i + 1 of any, in `rotated` order (turn = repeat * steps + i); `warmup` untimed runs
    of each variant (steps 0, 1, ...) come first; `before_repeat` runs before each repeat (untimed)."""
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"interleaved timing needs steps >= 1, repeats >= 1, warmup >= 0 (got {steps}, {repeats}, {warmup})")
    names = list(variants)
    for w in range(warmup):
        for name in names:
            with variants[name].around():
                variants[name].run(w % steps)
    out: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(repeats):
        if before_repeat is not None:
            before_repeat()
        for n in names:
            out[n].append([])
        for i in range(steps):
            for name in rotated(names, r * steps + i):
                v = variants[name]
                with v.around():
                    out[name][r].append(time_call(lambda: v.run(i), device))  # noqa: B023 (called at once)
    return out
