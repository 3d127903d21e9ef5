"""Cost of the context-cache lookup + insert per forward: tensor-backed (sorted keys + searchsorted,
what VAR uses) vs a Python dict keyed by int64 built from one `.tolist()` per forward.

    python -m benchmarks var_cache [--tokens 2048 --capacity 10000 --vocab 4096 --window 1 --repeats 30]
    python -m benchmarks var_cache --tokens 4 --prefill 10000 --repeats 300   # decode steps, full cache

Both see the same key stream (Zipf-like token ids, so hits happen) and do the same work: look up
T keys, then insert the misses. Reports the median microseconds per forward-layer for each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import OrderedDict

import torch

from var_moe.var.cache import ContextCache, encode_keys


def dict_step(cache: OrderedDict, full_TW: torch.Tensor, vocab: int, capacity: int, experts_TK: torch.Tensor) -> int:
    keys = encode_keys(full_TW, vocab).tolist()
    hits = 0
    miss_rows = []
    for i, k in enumerate(keys):  # the per-token Python work this design would need
        if k in cache:
            cache.move_to_end(k)
            hits += 1
        else:
            miss_rows.append(i)
    vals = experts_TK[miss_rows].tolist()
    for i, v in zip(miss_rows, vals):
        cache[keys[i]] = v
        if len(cache) > capacity:
            cache.popitem(last=False)
    return hits


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--capacity", type=int, default=10_000)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--prefill", type=int, default=0, help="random keys inserted before timing (a filled cache)")
    p.add_argument("--output", default=None, help="write the JSON here")
    a = p.parse_args(argv)
    if min(a.tokens, a.capacity, a.vocab, a.repeats) < 1 or a.window < 0 or a.prefill < 0:
        p.error("--tokens, --capacity, --vocab, --repeats must be >= 1; --window, --prefill >= 0")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, a.vocab + 1).double()
    streams = [torch.multinomial(weights, a.tokens * (a.window + 1), replacement=True, generator=g).reshape(a.tokens, -1)
               for _ in range(a.repeats + 5)]
    experts = torch.randint(0, 8, (a.tokens, 2), generator=g)
    tc = ContextCache(a.capacity, a.window + 1, 2, a.vocab)
    dc: OrderedDict = OrderedDict()
    if a.prefill:  # uniform random keys: mostly distinct, so the cache starts (nearly) full
        full = torch.randint(0, a.vocab, (a.prefill, a.window + 1), generator=g)
        pre_experts = torch.randint(0, 8, (a.prefill, 2), generator=g)
        tc.insert(full, pre_experts, torch.ones(a.prefill, 2), 0, 0.0)
        dict_step(dc, full, a.vocab, a.capacity, pre_experts)
    t_tensor, t_dict, h_tensor, h_dict = [], [], 0, 0
    for i, full in enumerate(streams):
        t0 = time.perf_counter()
        hit, _, _ = tc.lookup(full, i, 0.0)
        tc.insert(full[~hit], experts[~hit], torch.ones(int((~hit).sum()), 2), i, 0.0)
        t1 = time.perf_counter()
        hd = dict_step(dc, full, a.vocab, a.capacity, experts)
        t2 = time.perf_counter()
        if i >= 5:
            t_tensor.append(t1 - t0)
            t_dict.append(t2 - t1)
            h_tensor += int(hit.sum())
            h_dict += hd
    result = {"tokens": a.tokens, "capacity": a.capacity, "prefill": a.prefill, "entries_at_end": len(tc), "vocab": a.vocab, "window": a.window,
              "tensor_us_median": 1e6 * statistics.median(t_tensor), "dict_us_median": 1e6 * statistics.median(t_dict),
              "tensor_hits": h_tensor, "dict_hits": h_dict,
              "note": "hit counts differ slightly: LRU tie-breaking differs between the two"}
    print(json.dumps(result, indent=2))
    if a.output:
        open(a.output, "w").write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
