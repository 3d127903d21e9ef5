"""`var_moe.timing`: variants take turns in rotated order, warm-up runs are not kept, the untimed
context is entered around every run and costs nothing to the timing. Run: `pytest tests/test_timing.py`."""

import contextlib
import time

import pytest

from var_moe.timing import Variant, interleaved, rotated


def test_rotated_puts_each_first_equally_often():
    names = ["a", "b", "c"]
    firsts = [rotated(names, t)[0] for t in range(9)]
    assert firsts == ["a", "b", "c"] * 3 and rotated(names, 4) == ["b", "c", "a"]


def test_interleaved_order_warmup_and_shape():
    log, entered = [], []

    @contextlib.contextmanager
    def around():
        entered.append(len(log))
        time.sleep(0.02)  # untimed: must not show in the times
        yield

    variants = {"a": Variant(lambda i: log.append(("a", i)), around=around), "b": Variant(lambda i: log.append(("b", i)))}
    repeats_started = []
    out = interleaved(variants, steps=3, repeats=2, warmup=2, before_repeat=lambda: repeats_started.append(len(log)))
    assert log[:4] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]  # warm-up, not kept
    timed = log[4:]
    assert timed == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2),  # turn = repeat * steps + step
                     ("b", 0), ("a", 0), ("a", 1), ("b", 1), ("b", 2), ("a", 2)]
    assert repeats_started == [4, 10] and len(entered) == 2 + 6
    assert [len(r) for r in out["a"]] == [3, 3] and len(out["b"]) == 2
    assert max(x for r in out["a"] for x in r) < 0.015  # the 20 ms of `around` are outside the timed call


def test_interleaved_refuses_empty_work():
    with pytest.raises(ValueError, match="steps >= 1"):
        interleaved({"a": Variant(lambda i: None)}, steps=0, repeats=1)
