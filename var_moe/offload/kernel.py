"""The event loop of the expert-cache simulator: one token and layer after another, as decoding runs.

Cache policies are sequential by nature (each eviction depends on every earlier one), so this is a
tight loop over (token, layer) events in one function, compiled with numba when it is installed
(`pip install var-moe[offload]`) and run as plain Python otherwise: `run_kernel` picks the compiled
one, `run_kernel_python` is the same source uncompiled (the tests compare the two).

Timing model (times in ms; one copy engine, transfers first-in first-out; compute waits only
for the experts it needs):
- token t starts at `now` (+ `token_ms` for embedding/output layer); prefetches from `start_pred`
  (the token-table predictors, the oracle) are queued at that moment for every layer, layer 0 first;
- layer l computes its attention (`pre_ms`), then routes: experts not in the layer's cache are
  fetched on demand (queued behind whatever is already on the link), and prefetches from
  `next_pred` for layer l+1 (the speculative predictor) are queued after them;
- the experts run (`post_ms`) once every needed expert has arrived; the wait is the stall.
With `demand_first`, a demand fetch goes ahead of every prefetch not yet on the link (those move
back by one transfer), as a copy scheduler with priorities would.
A needed expert that is in the cache (arrived or still in flight) is a hit; a hit still in flight
stalls until it lands (counted in `late_hits`). Eviction: 0 LRU, 1 LFU (use counts since the start,
ties by recency), 2 Belady (the cached expert whose next use at this layer is farthest), 3 no cache
(every needed expert is fetched every time, as in "no LRU cache, no pre-loading"). A victim is
never an expert the current layer needs, nor one of the set being prefetched with it.

Shapes: T tokens, L layers, K top-k, C cache slots per layer, E experts.
Test: `pytest tests/test_offload_simulator.py`.
"""

from __future__ import annotations

import numpy as np

NEVER = np.iinfo(np.int64).max


def _kernel(experts_TLK, start_pred_TLK, next_pred_TLK, next_use_TLK, num_experts, cache_size, eviction,
            xfer_ms, pre_ms, post_ms, token_ms, demand_first):
    t_n, l_n, k_n = experts_TLK.shape
    slot_e = np.full((l_n, cache_size), -1, np.int64)
    slot_rec = np.zeros((l_n, cache_size), np.int64)
    slot_arr = np.zeros((l_n, cache_size), np.float64)
    slot_next = np.zeros((l_n, cache_size), np.int64)
    slot_pf = np.zeros((l_n, cache_size), np.bool_)  # prefetched and not yet used
    freq = np.zeros((l_n, num_experts), np.int64)
    hits_L = np.zeros(l_n, np.int64)
    misses_L = np.zeros(l_n, np.int64)
    stall_L = np.zeros(l_n, np.float64)
    # counters: demand transfers, prefetch transfers, useful prefetches, wasted prefetches, late hits
    cnt = np.zeros(5, np.int64)
    has_start = start_pred_TLK.shape[0] == t_n
    has_next = next_pred_TLK.shape[0] == t_n
    # prefetches not yet on the link, which a demand fetch may overtake (demand_first only)
    q_cap = 4 * l_n * k_n + 16
    q_l = np.zeros(q_cap, np.int64)
    q_s = np.zeros(q_cap, np.int64)
    q_e = np.zeros(q_cap, np.int64)
    q_begin = np.zeros(q_cap, np.float64)
    q_n = 0
    now = 0.0
    copy_free = 0.0
    clock = 0
    for t in range(t_n):
        now += token_ms
        if has_start:
            for l in range(l_n):
                for j in range(k_n):
                    e = start_pred_TLK[t, l, j]
                    if e < 0:
                        continue
                    clock += 1
                    found = -1
                    for c in range(cache_size):
                        if slot_e[l, c] == e:
                            found = c
                    if found >= 0:
                        slot_rec[l, found] = clock
                        if eviction == 2:
                            slot_next[l, found] = t
                        continue
                    victim = -1
                    best_a = 0
                    best_b = 0
                    for c in range(cache_size):
                        ce = slot_e[l, c]
                        if ce < 0:
                            victim = c
                            break
                        excluded = False
                        for jj in range(k_n):
                            if start_pred_TLK[t, l, jj] == ce:
                                excluded = True
                        if excluded:
                            continue
                        if eviction == 1:
                            a = -freq[l, ce]
                            b = -slot_rec[l, c]
                        elif eviction == 2:
                            a = slot_next[l, c]
                            b = -slot_rec[l, c]
                        else:
                            a = -slot_rec[l, c]
                            b = 0
                        if victim < 0 or a > best_a or (a == best_a and b > best_b):
                            victim, best_a, best_b = c, a, b
                    if victim < 0:
                        continue  # every slot holds part of this prefetch set (cache smaller than it)
                    if slot_e[l, victim] >= 0 and slot_pf[l, victim]:
                        cnt[3] += 1
                    begin = max(now, copy_free)
                    copy_free = begin + xfer_ms
                    cnt[1] += 1
                    if demand_first:
                        if q_n == q_cap:  # keep only the entries not yet started
                            kept = 0
                            for i in range(q_n):
                                if q_begin[i] > now:
                                    q_l[kept], q_s[kept], q_e[kept], q_begin[kept] = q_l[i], q_s[i], q_e[i], q_begin[i]
                                    kept += 1
                            q_n = kept
                        if q_n < q_cap:  # a full queue leaves this one first-in first-out
                            q_l[q_n], q_s[q_n], q_e[q_n], q_begin[q_n] = l, victim, e, begin
                            q_n += 1
                    slot_e[l, victim] = e
                    slot_rec[l, victim] = clock
                    slot_arr[l, victim] = copy_free
                    slot_next[l, victim] = t
                    slot_pf[l, victim] = True
        for l in range(l_n):
            route = now + pre_ms
            ready = route
            # hits first (touching them), then misses, so a miss never evicts a needed expert
            for j in range(k_n):
                e = experts_TLK[t, l, j]
                found = -1
                if eviction != 3:
                    for c in range(cache_size):
                        if slot_e[l, c] == e:
                            found = c
                if found < 0:
                    continue
                hits_L[l] += 1
                clock += 1
                slot_rec[l, found] = clock
                if eviction == 2:
                    slot_next[l, found] = next_use_TLK[t, l, j]
                if slot_pf[l, found]:
                    cnt[2] += 1
                    slot_pf[l, found] = False
                if slot_arr[l, found] > route:
                    cnt[4] += 1
            for j in range(k_n):
                e = experts_TLK[t, l, j]
                freq[l, e] += 1
                found = -1
                if eviction != 3:
                    for c in range(cache_size):
                        if slot_e[l, c] == e:
                            found = c
                if found >= 0:
                    continue
                misses_L[l] += 1
                clock += 1
                victim = -1
                best_a = 0
                best_b = 0
                for c in range(cache_size):
                    ce = slot_e[l, c]
                    if ce < 0:
                        victim = c
                        break
                    excluded = False
                    for jj in range(k_n):
                        if experts_TLK[t, l, jj] == ce:
                            excluded = True
                    if excluded:
                        continue
                    if eviction == 1:
                        a = -freq[l, ce]
                        b = -slot_rec[l, c]
                    elif eviction == 2:
                        a = slot_next[l, c]
                        b = -slot_rec[l, c]
                    else:
                        a = -slot_rec[l, c]
                        b = 0
                    if victim < 0 or a > best_a or (a == best_a and b > best_b):
                        victim, best_a, best_b = c, a, b
                first = copy_free
                pending = 0
                if demand_first:
                    for i in range(q_n):
                        if q_begin[i] > route:
                            pending += 1
                            if q_begin[i] < first:
                                first = q_begin[i]
                if pending > 0:  # go ahead of every prefetch not yet started; they move back by one transfer
                    arrival = first + xfer_ms
                    for i in range(q_n):
                        if q_begin[i] > route:
                            q_begin[i] += xfer_ms
                            if slot_e[q_l[i], q_s[i]] == q_e[i]:
                                slot_arr[q_l[i], q_s[i]] = q_begin[i] + xfer_ms
                    copy_free += xfer_ms
                else:
                    begin = max(route, copy_free)
                    copy_free = begin + xfer_ms
                    arrival = copy_free
                cnt[0] += 1
                if eviction == 3:
                    if arrival > ready:
                        ready = arrival
                    continue
                if slot_e[l, victim] >= 0 and slot_pf[l, victim]:
                    cnt[3] += 1
                slot_e[l, victim] = e
                slot_rec[l, victim] = clock
                slot_arr[l, victim] = arrival
                if eviction == 2:
                    slot_next[l, victim] = next_use_TLK[t, l, j]
                slot_pf[l, victim] = False
            if eviction != 3:  # every needed expert is in the cache now: wait for the last to land
                for j in range(k_n):
                    e = experts_TLK[t, l, j]
                    for c in range(cache_size):
                        if slot_e[l, c] == e and slot_arr[l, c] > ready:
                            ready = slot_arr[l, c]
            if has_next and l + 1 < l_n and eviction != 3:
                nl = l + 1
                for j in range(k_n):
                    e = next_pred_TLK[t, nl, j]
                    if e < 0:
                        continue
                    clock += 1
                    found = -1
                    for c in range(cache_size):
                        if slot_e[nl, c] == e:
                            found = c
                    if found >= 0:
                        slot_rec[nl, found] = clock
                        continue
                    victim = -1
                    best_a = 0
                    best_b = 0
                    for c in range(cache_size):
                        ce = slot_e[nl, c]
                        if ce < 0:
                            victim = c
                            break
                        excluded = False
                        for jj in range(k_n):
                            if next_pred_TLK[t, nl, jj] == ce:
                                excluded = True
                        if excluded:
                            continue
                        if eviction == 1:
                            a = -freq[nl, ce]
                            b = -slot_rec[nl, c]
                        elif eviction == 2:
                            a = slot_next[nl, c]
                            b = -slot_rec[nl, c]
                        else:
                            a = -slot_rec[nl, c]
                            b = 0
                        if victim < 0 or a > best_a or (a == best_a and b > best_b):
                            victim, best_a, best_b = c, a, b
                    if victim < 0:
                        continue
                    if slot_e[nl, victim] >= 0 and slot_pf[nl, victim]:
                        cnt[3] += 1
                    begin = max(route, copy_free)
                    copy_free = begin + xfer_ms
                    cnt[1] += 1
                    if demand_first:
                        if q_n == q_cap:
                            kept = 0
                            for i in range(q_n):
                                if q_begin[i] > route:
                                    q_l[kept], q_s[kept], q_e[kept], q_begin[kept] = q_l[i], q_s[i], q_e[i], q_begin[i]
                                    kept += 1
                            q_n = kept
                        if q_n < q_cap:
                            q_l[q_n], q_s[q_n], q_e[q_n], q_begin[q_n] = nl, victim, e, begin
                            q_n += 1
                    slot_e[nl, victim] = e
                    slot_rec[nl, victim] = clock
                    slot_arr[nl, victim] = copy_free
                    slot_next[nl, victim] = NEVER
                    slot_pf[nl, victim] = True
            stall_L[l] += ready - route
            now = ready + post_ms
    return hits_L, misses_L, stall_L, cnt, now


run_kernel_python = _kernel

_compiled: object | None = None


def compiled() -> bool:
    """Whether `run_kernel` runs compiled (numba installed). Imports numba on first use, never at
    import time: `varmoe` imports this module while it lists its subcommands, and numba in
    sys.modules breaks engines that walk every loaded module when their workers start (vLLM 0.32)."""
    global _compiled
    if _compiled is None:
        try:  # the compiled helper is an optional extra; the plain function gives the same numbers
            from numba import njit

            _compiled = njit(cache=True, nogil=True)(_kernel)
        except ImportError:  # pragma: no cover - depends on the install
            _compiled = _kernel
    return _compiled is not _kernel


def run_kernel(*args):
    """The event loop, compiled when numba is installed (compiled on the first call)."""
    compiled()
    return _compiled(*args)
