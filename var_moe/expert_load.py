"""Expert load: tokens per expert and routing entropy per MoE layer, counted on the device, and the
sliding-window statistics that `/metrics` exports.

`ExpertLoad` holds the counters as flat device buffers that are only ever added to in place (so a
compiled graph or a CUDA graph that captured them keeps updating the same memory):
- `counts_X`: routed slots per (group, layer slot, expert), flattened as
  (group * S + slot) * (E + 1) + expert; column E takes the experts' empty slot (adaptive k) and a
  last bin takes padding rows, neither reported. With `tiers` (e.g. ("fast", "learned") on a VAR
  engine) group g < len(tiers) holds tier g's rows and a last group the rows in no tier (baseline
  rows); without, one group. The per-layer totals are the sum over groups, taken at read time: one
  scatter per forward counts both (a scatter is one eager call, even inside a compiled graph);
- `entropy_L`: summed routing entropy (nats, of the router's probabilities over all E experts) of
  the valid rows, float64; `tokens_L`: valid rows per layer.
`count_forward` adds a whole forward at once (all layers stacked: a dozen tensor ops whatever the
layer count), eagerly or inside a compiled graph (vLLM's, once per step). It reads nothing back:
`read()` is the one device-to-host copy, done at scrape time.

`LoadWindow` turns cumulative readings into window statistics: it keeps the readings taken at
scrape time for `window_s` seconds (plus the newest one older than that) and compares the new
reading with the oldest kept one. Per layer: imbalance (the busiest expert's tokens over the mean
per expert), the busiest expert's share of routed slots, experts with no tokens, and the mean
entropy per token (the maximum is ln E). A layer with no token in the window reports NaN for the
ratios and all experts idle; `tokens` says how many routed tokens the window holds.

Shapes: T tokens, K top-k, E experts, L MoE layers (slots), X flattened counter bins.
Test: `pytest tests/test_expert_load.py`.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class LoadReading:
    """Cumulative counters on the host (from `ExpertLoad.read`)."""

    counts_LE: np.ndarray  # int64
    entropy_L: np.ndarray  # float64, nats summed over valid rows
    tokens_L: np.ndarray  # int64
    tier_counts_XLE: np.ndarray | None = None  # int64, tiers x layers x experts


@dataclass
class WindowStats:
    """Per-layer statistics of one window (arrays over layer slots)."""

    imbalance_L: np.ndarray  # max over mean tokens per expert (1 = perfectly even, E = one expert)
    hottest_share_L: np.ndarray  # the busiest expert's share of routed slots
    dead_L: np.ndarray  # experts with no token
    entropy_L: np.ndarray  # mean routing entropy per token, nats
    tokens_L: np.ndarray  # routed tokens in the window
    counts_LE: np.ndarray  # routed slots per expert in the window
    tier_imbalance_XL: np.ndarray | None = None  # imbalance per tier (NaN where a tier had no token)


class ExpertLoad:
    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str = "cpu",
                 tiers: tuple[str, ...] = ()):
        if num_layers < 1 or num_experts < 1:
            raise ValueError("expert load needs at least one MoE layer and one expert")
        self.num_layers, self.num_experts, self.tiers = int(num_layers), int(num_experts), tuple(tiers)
        device = torch.device(device)
        self.width = self.num_experts + 1  # the empty slot E is counted apart
        self.group = self.num_layers * self.width  # bins of one group (a tier, or all rows)
        self.groups = len(self.tiers) + 1 if self.tiers else 1  # the tiers, then rows in no tier
        self.trash = self.groups * self.group  # padding rows land here
        self.counts_X = torch.zeros(self.trash + 1, dtype=torch.long, device=device)
        self.entropy_L = torch.zeros(self.num_layers, dtype=torch.float64, device=device)
        self.tokens_L = torch.zeros(self.num_layers, dtype=torch.long, device=device)
        self.offset_L11 = (torch.arange(self.num_layers, device=device) * self.width)[:, None, None]

    @staticmethod
    def entropy(probs_TE: torch.Tensor) -> torch.Tensor:
        """Entropy (nats) of each row of a probability matrix."""
        p = probs_TE.float()
        return -(p * p.clamp_min(1e-30).log()).sum(-1)

    @staticmethod
    def entropy_of_logits(logits_TE: torch.Tensor) -> torch.Tensor:
        """Entropy (nats) of softmax(logits) per row, without forming the probabilities twice."""
        logp = torch.log_softmax(logits_TE.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    @torch.no_grad()
    def count_forward(self, idx_LTK: torch.Tensor, entropy_LT: torch.Tensor | None = None,
                      valid_T: torch.Tensor | None = None, tier_LT: torch.Tensor | None = None) -> None:
        """Add one forward of every layer (in place; traceable: no data-dependent branches): `idx_LTK`
        the experts each row was sent to (index E = the empty slot), `entropy_LT` each row's routing
        entropy, `valid_T` False for padding rows, `tier_LT` each row's tier per layer, an index into
        `tiers` (-1: in none, e.g. a baseline row)."""
        if valid_T is None:
            self.tokens_L += idx_LTK.shape[1]
        else:
            self.tokens_L += valid_T.sum()
        if entropy_LT is not None:
            h_LT = entropy_LT.double() if valid_T is None else entropy_LT.double() * valid_T
            self.entropy_L += h_LT.sum(-1)
        bins = idx_LTK.long() + self.offset_L11[: idx_LTK.shape[0]]
        if self.groups > 1:  # rows without a tier (or no tier given) go to the last group
            group_LT = torch.full_like(bins[..., 0], self.groups - 1) if tier_LT is None else \
                torch.where(tier_LT >= 0, tier_LT.long(), self.groups - 1)
            bins = bins + group_LT[..., None] * self.group
        if valid_T is not None:
            bins = torch.where(valid_T[None, :, None], bins, self.trash)
        ones = torch.ones_like(bins.reshape(-1))  # (not a kept buffer: a compiled graph has no branch to grow it)
        self.counts_X.index_add_(0, bins.reshape(-1), ones)

    def read(self) -> LoadReading:
        """The cumulative counters on the host (one copy each; the only synchronisation)."""
        c_GLE = self.counts_X[: self.trash].cpu().numpy().reshape(self.groups, self.num_layers, self.width)
        c_GLE = c_GLE[:, :, : self.num_experts]
        tiers = c_GLE[:-1].copy() if self.tiers else None
        return LoadReading(c_GLE.sum(0), self.entropy_L.cpu().numpy().copy(), self.tokens_L.cpu().numpy().copy(), tiers)

    def reset(self) -> None:
        self.counts_X.zero_()
        self.entropy_L.zero_()
        self.tokens_L.zero_()


def imbalance(counts_LE: np.ndarray) -> np.ndarray:
    """max / mean of tokens per expert, per layer (NaN where a layer has none)."""
    total = counts_LE.sum(-1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, counts_LE.max(-1) * counts_LE.shape[-1] / total, math.nan)


def window_stats(delta: LoadReading) -> WindowStats:
    """Statistics of the counts gathered in one window (a difference of two readings)."""
    c = delta.counts_LE
    total = c.sum(-1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total > 0, c.max(-1) / total, math.nan)
        ent = np.where(delta.tokens_L > 0, delta.entropy_L / delta.tokens_L, math.nan)
    tiers = None if delta.tier_counts_XLE is None else np.stack([imbalance(x) for x in delta.tier_counts_XLE])
    return WindowStats(imbalance(c), share, (c == 0).sum(-1), ent, delta.tokens_L.copy(), c.copy(), tiers)


def _minus(a: LoadReading, b: LoadReading) -> LoadReading:
    tiers = None
    if a.tier_counts_XLE is not None and b.tier_counts_XLE is not None:
        tiers = a.tier_counts_XLE - b.tier_counts_XLE
    return LoadReading(a.counts_LE - b.counts_LE, a.entropy_L - b.entropy_L, a.tokens_L - b.tokens_L, tiers)


class LoadWindow:
    """Sliding-window statistics from cumulative readings taken at scrape time (host only)."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic, max_kept: int = 4096):
        if window_s <= 0:
            raise ValueError(f"the expert-load window must be > 0 s, got {window_s}")
        self.window_s, self.clock = float(window_s), clock
        self._kept: collections.deque[tuple[float, LoadReading]] = collections.deque(maxlen=max_kept)

    def update(self, reading: LoadReading) -> WindowStats:
        """Statistics of what was counted between the oldest kept reading and `reading` (since the
        counters started, for the first reading), then keep `reading`."""
        now = self.clock()
        # keep the newest reading at least window_s old as the window's start, drop older ones
        while len(self._kept) >= 2 and now - self._kept[1][0] >= self.window_s:
            self._kept.popleft()
        if self._kept:
            base = self._kept[0][1]
        else:
            zero = lambda a: None if a is None else np.zeros_like(a)  # noqa: E731
            base = LoadReading(np.zeros_like(reading.counts_LE), np.zeros_like(reading.entropy_L),
                               np.zeros_like(reading.tokens_L), zero(reading.tier_counts_XLE))
        self._kept.append((now, reading))
        return window_stats(_minus(reading, base))
