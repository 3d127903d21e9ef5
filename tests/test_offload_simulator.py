"""Expert-cache simulator: hand-made traces whose hits, transfers and stalls are worked out by hand,
the compiled loop against the plain-Python one, Belady's next-use table, and the anchor's fit.

Run: `pytest tests/test_offload_simulator.py`.
"""

from __future__ import annotations

import numpy as np
import pytest

from var_moe.errors import InvalidInputError
from var_moe.offload import kernel
from var_moe.offload.anchor import PUBLISHED, fit_bandwidth_and_overhead, fit_overhead
from var_moe.offload.hardware import MIXTRAL_8X7B, PROFILES, HardwareProfile, ModelShape
from var_moe.offload.simulator import POLICIES, SimConfig, next_use, simulate, simulate_policies
from var_moe.offload.trace import Trace

NONE = np.full((0, 1, 1), -1, np.int16)
LRU, LFU, BELADY, NOCACHE = 0, 1, 2, 3


def run(experts, cache, eviction, start=None, nxt=None, e=3, pre=1.0, post=1.0, xfer=10.0, demand_first=False):
    ex = np.asarray(experts, np.int16)
    t, l, k = ex.shape
    none = np.full((0, l, k), -1, np.int16)
    st = none if start is None else np.asarray(start, np.int16)
    nx = none if nxt is None else np.asarray(nxt, np.int16)
    nu = next_use(ex, e) if eviction == BELADY else np.zeros((1, 1, 1), np.int64)
    out = kernel.run_kernel_python(ex, st, nx, nu, e, cache, eviction, xfer, pre, post, 0.0, demand_first)
    hits_L, misses_L, stall_L, cnt, total = out
    return {"hits": int(hits_L.sum()), "misses": int(misses_L.sum()), "stall": float(stall_L.sum()), "total": float(total),
            "demand": int(cnt[0]), "prefetch": int(cnt[1]), "useful": int(cnt[2]), "wasted": int(cnt[3]), "late": int(cnt[4])}


def col(seq):  # one layer, top-1
    return [[[x]] for x in seq]


def test_lru_by_hand():
    # t0 miss 0 | t1 miss 1 | t2 hit 0 | t3 miss 2 evicts 1 (least recent) | t4 miss 1 evicts 0
    r = run(col([0, 1, 0, 2, 1]), cache=2, eviction=LRU)
    assert (r["hits"], r["misses"], r["demand"]) == (1, 4, 4)
    assert r["stall"] == 40.0 and r["total"] == 50.0  # 5 x (1 + 1) compute + 4 x 10 waiting


def test_lfu_keeps_the_frequent_expert_where_lru_drops_it():
    seq = col([0, 0, 1, 2, 0])
    assert run(seq, 2, LRU)["hits"] == 1  # t3 evicts 0 (used at t1, before 1 at t2)
    assert run(seq, 2, LFU)["hits"] == 2  # t3 evicts 1 (used once); t4 hits 0


def test_belady_evicts_the_farthest_next_use():
    seq = col([0, 1, 2, 0, 1])
    assert run(seq, 2, LRU)["hits"] == 0
    r = run(seq, 2, BELADY)  # t2 evicts 1 (next use t4) rather than 0 (t3)
    assert r["hits"] == 1 and r["misses"] == 4


def test_nocache_fetches_every_expert_every_time():
    r = run(col([0, 0]), cache=1, eviction=NOCACHE)
    assert (r["hits"], r["demand"], r["total"]) == (0, 2, 24.0)


def test_token_start_prefetch_overlaps_the_first_layers():
    # one token, two layers; both experts queued at t=0: arrive at 10 and 20
    ex = [[[0], [1]]]
    r = run(ex, cache=1, eviction=LRU, start=ex)
    assert (r["hits"], r["late"], r["prefetch"], r["useful"]) == (2, 2, 2, 2)
    assert r["stall"] == 9.0 + 8.0 and r["total"] == 21.0
    base = run(ex, cache=1, eviction=LRU)
    assert base["total"] == 24.0 and base["hits"] == 0


def test_speculative_prefetch_right_and_wrong():
    ex = [[[0], [1]]]
    right = run(ex, 1, LRU, nxt=[[[-1], [1]]])  # layer 1's expert queued when layer 0 routes, behind its miss
    assert (right["hits"], right["prefetch"], right["useful"], right["total"]) == (1, 1, 1, 22.0)
    wrong = run(ex, 1, LRU, nxt=[[[-1], [2]]])  # the wrong expert takes the link: layer 1's miss waits behind it
    assert (wrong["hits"], wrong["wasted"], wrong["total"]) == (0, 1, 32.0)
    assert wrong["stall"] == 10.0 + 18.0


def test_oracle_prefetch_with_belady_by_hand():
    # t0: expert 0 queued at 0, lands at 10, layer routes at 1 -> stall 9, ends 11
    # t1: expert 1 queued at 11 (evicting 0), lands 21, routes at 12 -> stall 9, ends 22
    r = run(col([0, 1]), cache=1, eviction=BELADY, start=col([0, 1]))
    assert (r["hits"], r["prefetch"], r["useful"], r["demand"]) == (2, 2, 2, 0)
    assert r["stall"] == 18.0 and r["total"] == 22.0
    assert run(col([0, 1]), cache=1, eviction=LRU)["total"] == 24.0


def test_combined_uses_the_gate_only_where_the_table_is_silent():
    from var_moe.offload.simulator import _plan_arrays

    ex = np.asarray([[[0], [1]], [[2], [1]]], np.int16)
    tr = Trace(np.array([5, 6], np.int32), np.zeros(2, np.int32), ex, 3, [0, 1])
    var = np.asarray([[[0], [-1]], [[2], [1]]], np.int16)  # token 0 has no entry at layer 1
    spec = np.asarray([[[-1], [2]], [[-1], [0]]], np.int16)
    ev, start, nxt = _plan_arrays(tr, {"var": var, "speculative": spec}, "combined")
    assert ev == LRU and np.array_equal(start, var)
    assert nxt[:, 1, 0].tolist() == [2, -1]  # gate kept for token 0, dropped for token 1
    out = run(ex, 1, LRU, start=start, nxt=nxt)
    # token 0: layer 0 prefetched; layer 1's gate prefetch (2) is wrong -> its miss waits behind it
    # token 1: both layers prefetched from the table at token start
    assert (out["prefetch"], out["wasted"], out["hits"]) == (3, 1, 3)


def test_demand_fetch_overtakes_queued_prefetches():
    # one token, two layers, cache 1; the table predicts layer 0 wrongly (2) and layer 1 rightly (1).
    ex = [[[0], [1]]]
    start = [[[2], [1]]]
    fifo = run(ex, 1, LRU, start=start)
    # FIFO: 2 on the link 0-10, 1 on 10-20; layer 0's miss (0) waits until 20-30 -> layer 0 ends 31,
    # layer 1 routes at 32 with 1 landed at 20: no stall
    assert (fifo["total"], fifo["stall"], fifo["hits"]) == (33.0, 29.0, 1)
    first = run(ex, 1, LRU, start=start, demand_first=True)
    # demand first: 2 is already on the link (0-10); 0 goes before the queued 1: 10-20, 1 moves to 20-30.
    # layer 0 ends 21; layer 1 routes at 22 and waits for 1 until 30 -> ends 31
    assert (first["total"], first["stall"], first["hits"]) == (31.0, 19.0 + 8.0, 1)
    # without prefetches the flag changes nothing
    assert run(col([0, 1, 0, 2, 1]), 2, LRU, demand_first=True) == run(col([0, 1, 0, 2, 1]), 2, LRU)


def test_prefetch_of_a_cached_expert_moves_nothing():
    ex = [[[0]], [[0]]]
    r = run(ex, 1, LRU, start=ex)
    assert r["prefetch"] == 1 and r["hits"] == 2 and r["demand"] == 0


def _random_trace(t=400, l=3, k=2, e=6, seed=0):
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(l)]) for _ in range(t)]).astype(np.int16)
    spec = np.where(rng.random((t, l, 1)) < 0.6, ex, (ex + 1) % e).astype(np.int16)
    spec[:, 0] = -1
    seq = np.repeat(np.arange(t // 50), 50).astype(np.int32)
    return Trace(rng.integers(0, 20, t).astype(np.int32), seq, ex, e, list(range(l)), None, spec)


def _preds(tr):
    var = np.where(tr.token_ids_T[:, None, None] % 3 == 0, tr.experts_TLK, -1).astype(np.int16)
    return {"var": var, "var_pair": var, "token_modal": var, "speculative": tr.spec_TLK, "oracle": tr.experts_TLK}


SHAPE = ModelShape("toy", num_layers=3, num_experts=6, top_k=2, hidden=64, intermediate=128, num_heads=4,
                   num_kv_heads=4, head_dim=16)
PROFILE = HardwareProfile("toy", h2d_GBps=1e-4, gpu_mem_GBps=1e-2, pcie="none", h2d_source="test", gpu_source="test")


@pytest.mark.parametrize("demand_first", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_compiled_equals_python(policy, demand_first):
    tr = _random_trace()
    cfg = SimConfig(cache_size=3, demand_first=demand_first)
    a = simulate(tr, _preds(tr), cfg, PROFILE, SHAPE, policy, compiled=True)
    b = simulate(tr, _preds(tr), cfg, PROFILE, SHAPE, policy, compiled=False)
    assert a.to_dict() == b.to_dict()


def test_policy_ordering_on_a_random_trace():
    tr = _random_trace()
    res = simulate_policies(tr, _preds(tr), SimConfig(cache_size=3), PROFILE, SHAPE, POLICIES)
    assert res["oracle"].hit_rate == 1.0
    assert res["belady"].hit_rate >= max(res["lru"].hit_rate, res["lfu"].hit_rate)
    assert res["nocache"].hit_rate == 0.0
    assert res["oracle"].tokens_per_s >= res["lru"].tokens_per_s
    # combined never prefetches speculatively where the table already has the layer
    assert res["combined"].prefetch_transfers <= res["var"].prefetch_transfers + res["speculative"].prefetch_transfers


def test_simulate_sizes_and_rates():
    tr = _random_trace()
    r = simulate(tr, _preds(tr), SimConfig(cache_size=2, expert_bits=8), PROFILE, SHAPE, "lru")
    expert_bytes = 3 * 64 * 128
    assert r.transfer_ms_per_expert == pytest.approx(expert_bytes / 1e5 * 1e3)
    assert r.bytes_moved == (r.demand_transfers + r.prefetch_transfers) * expert_bytes
    assert r.tokens_per_s == pytest.approx(tr.num_tokens / (r.total_ms / 1e3))


def test_next_use_table():
    ex = np.asarray(col([0, 1, 0, 2, 0]), np.int16)
    nu = next_use(ex, 3)[:, 0, 0]
    big = np.iinfo(np.int64).max
    assert nu.tolist() == [2, big, 4, big, big]


def test_bad_inputs_are_named():
    tr = _random_trace()
    with pytest.raises(InvalidInputError, match="cache-size"):
        simulate(tr, _preds(tr), SimConfig(cache_size=1), PROFILE, SHAPE, "lru")
    with pytest.raises(InvalidInputError, match="policy"):
        simulate(tr, _preds(tr), SimConfig(cache_size=2), PROFILE, SHAPE, "fifo")
    with pytest.raises(InvalidInputError, match="var"):
        simulate(tr, {"speculative": tr.spec_TLK}, SimConfig(cache_size=2), PROFILE, SHAPE, "var")
    with pytest.raises(InvalidInputError, match="map it first"):
        simulate(tr, _preds(tr), SimConfig(cache_size=2), PROFILE, MIXTRAL_8X7B, "lru")


def test_anchor_fits_reproduce_the_nocache_row():
    tr = _random_trace(t=200, l=4, k=2, e=8)
    mt = tr.map_layers(32)
    for gpu in ("rtx3060", "a100"):
        ov = fit_overhead(MIXTRAL_8X7B, PROFILES[gpu], 2.6, PUBLISHED["nocache"]["2"][gpu])
        r = simulate(mt, {}, SimConfig(cache_size=2, expert_bits=2.6), PROFILES[gpu].with_overhead(ov), MIXTRAL_8X7B, "nocache")
        assert r.tokens_per_s == pytest.approx(PUBLISHED["nocache"]["2"][gpu], rel=1e-9)
        bw, ov2 = fit_bandwidth_and_overhead(MIXTRAL_8X7B, PROFILES[gpu])
        for bits, b in (("2", 2.6), ("3", 3.25)):
            prof = HardwareProfile(**{**PROFILES[gpu].to_dict(), "h2d_GBps": bw, "overhead_ms_per_layer": ov2})
            r = simulate(mt, {}, SimConfig(cache_size=2, expert_bits=b), prof, MIXTRAL_8X7B, "nocache")
            assert r.tokens_per_s == pytest.approx(PUBLISHED["nocache"][bits][gpu], rel=1e-6)


def test_profiles_cite_their_sources():
    for p in PROFILES.values():
        assert p.h2d_source and p.gpu_source and "GB/s" in p.gpu_source
        assert HardwareProfile.from_dict(p.to_dict()) == p
    assert SimConfig.from_json(SimConfig(cache_size=4).to_json()) == SimConfig(cache_size=4)
