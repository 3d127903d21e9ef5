"""Expert-cache simulator: a trace, a cache size, a policy and a hardware profile -> hit rate, bytes, stalls, tokens/s.

Policies (each a per-layer cache of `cache_size` experts; see `kernel.py` for the timing model):
- `lru`, `lfu`: demand fetching only, least-recently / least-frequently used eviction;
- `var`: LRU + prefetch of the VAR token table's set for every layer at token start;
- `speculative`: LRU + prefetch of layer l+1's speculative prediction when layer l routes
  (Mixtral-offloading's "LRU + speculative");
- `combined`: `var` where the table has the token at that layer, `speculative` elsewhere;
- `oracle`: the true sets prefetched at token start with Belady eviction: the ceiling of prefetching;
- extras: `var_pair` / `token_modal` (LRU + those tables' sets at token start), `belady`
  (demand only, Belady eviction: the best any demand cache can do), `nocache` (every expert
  fetched every time: "W/o LRU cache & pre-loading").

`simulate(trace, preds, SimConfig(...), policy)` returns a `SimResult`; `POLICIES_ALL` is what
`--policy all` runs. Sizes come from a `ModelShape` (the trace's model, or Mixtral-8x7B with the
trace mapped onto its layers). Test: `pytest tests/test_offload_simulator.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from . import kernel
from .hardware import HardwareProfile, ModelShape
from .trace import Trace

POLICIES_ALL = ("lru", "lfu", "var", "speculative", "combined", "oracle")
POLICIES_EXTRA = ("var_pair", "token_modal", "belady", "nocache")
POLICIES = POLICIES_ALL + POLICIES_EXTRA
EVICTION = {"lru": 0, "lfu": 1, "belady": 2, "nocache": 3}
# policy -> (eviction, predictor prefetched at token start, predictor prefetched one layer ahead)
PLANS: dict[str, tuple[str, str | None, str | None]] = {
    "lru": ("lru", None, None),
    "lfu": ("lfu", None, None),
    "var": ("lru", "var", None),
    "speculative": ("lru", None, "speculative"),
    "combined": ("lru", "var", "speculative"),
    "oracle": ("belady", "oracle", None),
    "var_pair": ("lru", "var_pair", None),
    "token_modal": ("lru", "token_modal", None),
    "belady": ("belady", None, None),
    "nocache": ("nocache", None, None),
}


@dataclass(frozen=True)
class SimConfig:
    cache_size: int = 2  # experts per layer held on the GPU
    expert_bits: float = 2.6  # bits per expert weight incl. quantisation scales (HQQ 2-bit: 2.6)
    attn_bits: float = 4.0  # bits per attention weight
    router_share: float = 0.5  # share of a layer's compute before its router (attention)
    token_ms: float = 0.0  # per-token time outside the layers (embedding, output layer)
    demand_first: bool = False  # a demand fetch overtakes prefetches not yet on the link (else first in first out)

    def __post_init__(self) -> None:
        if self.cache_size < 1:
            raise InvalidInputError(f"--cache-size must be >= 1, got {self.cache_size}")
        if self.expert_bits <= 0 or self.attn_bits <= 0:
            raise InvalidInputError("--bits and --attn-bits must be positive")
        if not 0 <= self.router_share <= 1:
            raise InvalidInputError(f"router_share must be in [0, 1], got {self.router_share}")
        if self.token_ms < 0:
            raise InvalidInputError("token_ms must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SimConfig":
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(f"unknown simulator config fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class SimResult:
    policy: str
    tokens: int
    layers: int
    hit_rate: float
    hit_rate_L: list[float]
    demand_transfers: int
    prefetch_transfers: int
    useful_prefetches: int
    wasted_prefetches: int
    late_hits: int
    bytes_moved: float
    stall_ms: float
    stall_share: float
    total_ms: float
    tokens_per_s: float
    compute_ms_per_layer: float
    transfer_ms_per_expert: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def next_use(experts_TLK: np.ndarray, num_experts: int) -> np.ndarray:
    """`next_TLK[t, l, j]`: the next token index after t whose layer l uses expert experts[t, l, j] (int64 max if none)."""
    t_n, l_n, k_n = experts_TLK.shape
    used_TLE = np.zeros((t_n, l_n, num_experts), dtype=bool)
    t_idx, l_idx = np.meshgrid(np.arange(t_n), np.arange(l_n), indexing="ij")
    for j in range(k_n):
        used_TLE[t_idx, l_idx, experts_TLK[:, :, j]] = True
    big = np.iinfo(np.int64).max
    occ_TLE = np.where(used_TLE, np.arange(t_n)[:, None, None], big)
    # strictly after t: the running minimum from the end, shifted by one token
    nxt_TLE = np.full_like(occ_TLE, big)
    nxt_TLE[:-1] = np.minimum.accumulate(occ_TLE[::-1], axis=0)[::-1][1:]
    return np.take_along_axis(nxt_TLE, experts_TLK.astype(np.int64), axis=2)


def _plan_arrays(trace: Trace, preds: dict[str, np.ndarray], policy: str) -> tuple[int, np.ndarray, np.ndarray]:
    if policy not in PLANS:
        raise InvalidInputError(f"--policy must be one of {', '.join(POLICIES)} or 'all', got {policy!r}")
    eviction, start_name, next_name = PLANS[policy]
    empty = np.full((0, trace.num_layers, trace.top_k), -1, np.int16)

    def need(name: str) -> np.ndarray:
        if name not in preds:
            raise InvalidInputError(f"policy {policy!r} needs the {name!r} predictor, which these inputs do not give "
                                    "(var: --tables; var_pair: --tables with pair tables, else --calibration-trace; "
                                    "token_modal: --calibration-trace)")
        pred = preds[name]
        if pred.shape != trace.experts_TLK.shape:
            raise InvalidInputError(f"predictor {name!r} has shape {pred.shape}, the trace {trace.experts_TLK.shape}")
        return pred

    start = need(start_name) if start_name else empty
    nxt = need(next_name) if next_name else empty
    if next_name == "speculative" and not bool(np.any(nxt >= 0)):
        raise InvalidInputError(f"policy {policy!r}: the trace has no speculative predictions (a routing array "
                                "without them); record the trace with `varmoe trace`")
    if start_name and next_name:  # combined: speculative only where the table has nothing for that layer
        nxt = np.where((start[..., :1] >= 0), np.int16(-1), nxt).astype(np.int16)
    return EVICTION[eviction], np.ascontiguousarray(start, dtype=np.int16), np.ascontiguousarray(nxt, dtype=np.int16)


def simulate(trace: Trace, preds: dict[str, np.ndarray], config: SimConfig, profile: HardwareProfile,
             shape: ModelShape, policy: str, compiled: bool = True, next_use_TLK: np.ndarray | None = None) -> SimResult:
    """Simulate decoding `trace` (already on `shape`'s layers) under `policy`."""
    if shape.num_layers != trace.num_layers or shape.top_k != trace.top_k or shape.num_experts != trace.num_experts:
        raise InvalidInputError(
            f"trace ({trace.num_layers} layers, {trace.num_experts} experts, top-{trace.top_k}) does not match model "
            f"shape {shape.name} ({shape.num_layers}, {shape.num_experts}, top-{shape.top_k}); map it first")
    if config.cache_size < trace.top_k:
        raise InvalidInputError(f"--cache-size {config.cache_size} is below top-k {trace.top_k}: a layer could not "
                                "hold the experts it runs")
    if config.cache_size > trace.num_experts:
        raise InvalidInputError(f"--cache-size {config.cache_size} exceeds the {trace.num_experts} experts per layer")
    eviction, start, nxt = _plan_arrays(trace, preds, policy)
    if next_use_TLK is None:
        next_use_TLK = next_use(trace.experts_TLK, trace.num_experts) if eviction == 2 else np.zeros((1, 1, 1), np.int64)
    layer_ms = shape.layer_compute_ms(profile, config.expert_bits, config.attn_bits)
    xfer_ms = shape.expert_bytes(config.expert_bits) / (profile.h2d_GBps * 1e9) * 1e3
    run = kernel.run_kernel if compiled else kernel.run_kernel_python
    hits_L, misses_L, stall_L, cnt, total_ms = run(
        np.ascontiguousarray(trace.experts_TLK, dtype=np.int16), start, nxt, next_use_TLK, int(trace.num_experts),
        int(config.cache_size), int(eviction), float(xfer_ms), float(layer_ms * config.router_share),
        float(layer_ms * (1 - config.router_share)), float(config.token_ms), bool(config.demand_first))
    need_L = hits_L + misses_L
    transfers = int(cnt[0] + cnt[1])
    stall = float(stall_L.sum())
    return SimResult(
        policy=policy, tokens=trace.num_tokens, layers=trace.num_layers,
        hit_rate=float(hits_L.sum() / max(need_L.sum(), 1)),
        hit_rate_L=(hits_L / np.maximum(need_L, 1)).tolist(),
        demand_transfers=int(cnt[0]), prefetch_transfers=int(cnt[1]), useful_prefetches=int(cnt[2]),
        wasted_prefetches=int(cnt[3]), late_hits=int(cnt[4]),
        bytes_moved=float(transfers * shape.expert_bytes(config.expert_bits)),
        stall_ms=stall, stall_share=float(stall / total_ms) if total_ms > 0 else 0.0, total_ms=float(total_ms),
        tokens_per_s=float(trace.num_tokens / (total_ms / 1e3)) if total_ms > 0 else float("inf"),
        compute_ms_per_layer=float(layer_ms), transfer_ms_per_expert=float(xfer_ms),
    )


def map_predictions(preds: dict[str, np.ndarray], source_layers: int, num_layers: int) -> dict[str, np.ndarray]:
    """Predictions mapped like `Trace.map_layers`: layer m takes source layer m mod L."""
    src = np.arange(num_layers) % source_layers
    return {name: np.ascontiguousarray(p[:, src]) for name, p in preds.items()}


def simulate_policies(trace: Trace, preds: dict[str, np.ndarray], config: SimConfig, profile: HardwareProfile,
                      shape: ModelShape, policies: tuple[str, ...] = POLICIES_ALL) -> dict[str, SimResult]:
    """Every policy in `policies` on one trace (Belady's next-use table computed once)."""
    nu = next_use(trace.experts_TLK, trace.num_experts) if any(PLANS[p][0] == "belady" for p in policies if p in PLANS) else None
    return {p: simulate(trace, preds, config, profile, shape, p, next_use_TLK=nu if PLANS.get(p, ("",))[0] == "belady" else None)
            for p in policies}
