"""Expert load: tokens per expert and routing entropy per MoE layer, counted on the device, and the
sliding-window statistics that `/metrics` exports.

`ExpertLoad` holds the counters as flat device buffers that are only ever added to in place (so a
compiled graph or a CUDA graph that captured them keeps updating the same memory):
- `counts_X` (float64): routed slots per (group, layer slot, expert), flattened as
  (group * S + slot) * (E + 1) + expert; column E takes the experts' empty slot (adaptive k). With
  `tiers` (e.g. ("fast", "learned") on a VAR engine) group g < len(tiers) holds tier g's rows and a
  last group the rows in no tier (baseline rows); without, one group. The per-layer totals are the
  sum over groups, taken at read time. After the expert bins come S bins of summed routing entropy
  (nats, of the router's probabilities over all E experts) and S bins of valid rows per layer.
  One `index_add_` per forward adds all of it, padding rows with weight 0: in a compiled graph every
  further reduction or buffer costs the graph's wrapper per call (docs/BENCHMARKS.md, expert load).
  Float64 counts are exact up to 2**53.
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
        self.bins = self.groups * self.group  # expert bins; then entropy and tokens per layer
        self.entropy_at, self.tokens_at = self.bins, self.bins + self.num_layers
        self.end = self.bins + 2 * self.num_layers
        self.counts_X = torch.zeros(self.end, dtype=torch.float64, device=device)
        self.offset_L11 = (torch.arange(self.num_layers, device=device) * self.width)[:, None, None]
        self.side_L12 = self.bins + torch.arange(self.num_layers, device=device)[:, None, None] \
            + torch.tensor([0, self.num_layers], device=device)  # each layer's (entropy, tokens) bins

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
        n_l, n_t, k = idx_LTK.shape
        dev = idx_LTK.device
        # per (layer, row): its k expert bins, then its entropy bin and its token bin, filled by
        # slice (an eager cat of broadcast parts costs several times the scatter)
        bins = torch.empty((n_l, n_t, k + 2), dtype=torch.long, device=dev)
        bins[..., :k] = idx_LTK.long() + self.offset_L11[:n_l]
        if self.groups > 1:  # rows without a tier (or no tier given) go to the last group
            group_LT = torch.full((n_l, n_t), self.groups - 1, dtype=torch.long, device=dev) if tier_LT is None \
                else torch.where(tier_LT >= 0, tier_LT.long(), self.groups - 1)
            bins[..., :k] += group_LT[..., None] * self.group
        bins[..., k:] = self.side_L12[:n_l]
        # padding rows add 0 (their experts are in range: a router's top-k or a table's); weighting
        # the values is a fraction of the cost of redirecting the bins
        vals = torch.empty((n_l, n_t, k + 2), dtype=torch.float64, device=dev)
        w_T = torch.ones(n_t, dtype=torch.float64, device=dev) if valid_T is None else valid_T.double()
        vals[..., :k] = w_T[None, :, None]
        vals[..., k + 1] = w_T[None, :]
        if entropy_LT is None:
            vals[..., k] = 0.0
        else:  # a padding row's entropy may be NaN: selected out, not multiplied by 0
            vals[..., k] = entropy_LT if valid_T is None else torch.where(valid_T[None, :], entropy_LT.double(), 0.0)
        self.counts_X.index_add_(0, bins.reshape(-1), vals.reshape(-1))

    def read(self) -> LoadReading:
        """The cumulative counters on the host (one copy each; the only synchronisation)."""
        c_X = self.counts_X.cpu().numpy()
        c_GLE = c_X[: self.bins].round().astype(np.int64).reshape(self.groups, self.num_layers, self.width)
        c_GLE = c_GLE[:, :, : self.num_experts]
        tiers = c_GLE[:-1].copy() if self.tiers else None
        entropy_L = c_X[self.entropy_at:self.tokens_at].copy()
        tokens_L = c_X[self.tokens_at:].round().astype(np.int64)
        return LoadReading(c_GLE.sum(0), entropy_L, tokens_L, tiers)

    def reset(self) -> None:
        self.counts_X.zero_()


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
