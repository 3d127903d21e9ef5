"""RouterAnalyzer: hooks a model's real routers and accumulates Phase 1 routing statistics.

Seed API kept: `RouterAnalyzer(model, layer_indices=None)`, `analyze_batch(input_ids,
attention_mask)`, `get_vocabulary_analysis() -> DataFrame`. Underneath, a `RoutingRecorder`
hands every router call's float32 decision and the aligned `TokenBatch` to
`StreamingTokenStats` (per layer and token) and `PairStats` ((previous, token) -> top-k set).
Padding rows (attention mask 0) are dropped before any statistic. Memory grows with the distinct
(layer, token) rows and (layer, token, expert) cells seen (set counts and the pair table are
bounded by lossy counting), not with L x V x E.

A server can accumulate statistics from its own forwards, `generate()` decode steps included:
    with analyzer.capturing():
        model.generate(...)
Consecutive-token pairs cross forwards only where the tracker says the sequence continues (a
decode step); the previous token's choices are carried per batch row for that.

Each layer's hook only keeps its (valid rows of the) decision; when the last tracked layer of a
forward has run, all layers are folded into the statistics with one vectorized update
(`flush_pending`, also called by every reader, `detach` and the end of `capturing`).

Test: `pytest tests/test_capture_stats.py`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..adapters import RouterDecision, get_adapter
from ..errors import InvalidInputError
from ..token_tracker import TokenBatch
from .frame import stats_to_dataframe
from .pairs import DEFAULT_CAPACITY, PairStats
from .recorder import RoutingRecorder
from .schema import library_versions, pairs_path, write_pairs, write_stats
from .streaming_stats import StreamingTokenStats, previous_rows, ranked_choices


@dataclass
class _Aligned:
    """Valid rows of one forward and their alignment (N = valid rows, B = batch rows)."""

    keep_N: torch.Tensor  # indices of the valid rows among the T router rows
    all_valid: bool
    ids_N: torch.Tensor
    prev_ids_N: torch.Tensor  # previous valid token id of the same sequence, -1 at a start
    prev_N: torch.Tensor  # index (among valid rows) of the previous token in this forward, -1 if none
    continues_N: torch.Tensor  # True where the previous token was in an earlier forward (decode step)
    row_N: torch.Tensor  # batch row of each valid row
    last_N_B: torch.Tensor  # index of each batch row's last valid row, -1 if the row is all padding
    batch_size: int


class RouterAnalyzer:
    def __init__(
        self,
        model: nn.Module,
        layer_indices: Sequence[int] | None = None,
        tokenizer: Any = None,
        track_pairs: bool = True,
        pair_capacity: int = DEFAULT_CAPACITY,
        device: str | torch.device | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = get_adapter(model)
        self.recorder = RoutingRecorder(model, self._on_router, layer_indices=layer_indices, window=1, adapter=self.adapter)
        layers = self.recorder.layer_indices
        device = torch.device(device) if device is not None else next(model.parameters()).device
        vocab = int(model.config.vocab_size)
        E, K = self.adapter.num_experts, self.adapter.top_k
        self.stats = StreamingTokenStats(len(layers), vocab, E, K, device=device, layer_ids=layers)
        self.pairs = PairStats(layers, vocab, E, K, capacity=pair_capacity, device=device) if track_pairs else None
        self.padding_excluded = 0
        self._carry: torch.Tensor | None = None  # (L, B, 2) last choices of every batch row, per layer
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # slot -> this forward's decision
        self._aligned: tuple[TokenBatch, _Aligned] | None = None

    # -- hooks ---------------------------------------------------------------------------------
    def _prepare(self, tokens: TokenBatch) -> _Aligned:
        """Per-forward alignment shared by every layer (computed at the first hooked layer)."""
        if self._aligned is not None and self._aligned[0] is tokens:
            return self._aligned[1]
        self.flush_pending()  # a forward that did not reach every tracked layer
        dev = self.stats.device
        b, s = tokens.batch_size, tokens.seq_len
        valid_BS = tokens.valid_T.to(dev).reshape(b, s)
        keep_N = valid_BS.reshape(-1).nonzero().squeeze(1)  # N = valid rows
        n = keep_N.numel()
        self.padding_excluded += b * s - n
        compact_T = valid_BS.reshape(-1).long().cumsum(0) - 1  # row index -> index among valid rows
        prev_row_N = previous_rows(valid_BS)[keep_N]
        prev_N = torch.where(prev_row_N >= 0, compact_T[prev_row_N.clamp_min(0)], prev_row_N)
        prev_ids_N = tokens.prev_T.to(dev)[keep_N]
        # first valid token of a row whose sequence continues from an earlier forward (decode step)
        continues_N = (prev_N < 0) & (prev_ids_N >= 0)
        row_N = keep_N // s
        pos_BS = torch.arange(s, device=dev).expand(b, s)
        last_B = torch.where(valid_BS, pos_BS, torch.full_like(pos_BS, -1)).max(dim=1).values
        last_N_B = torch.where(last_B >= 0, compact_T[(torch.arange(b, device=dev) * s + last_B.clamp_min(0))], last_B)
        aligned = _Aligned(keep_N, n == b * s, tokens.ids_T.to(dev)[keep_N], prev_ids_N, prev_N, continues_N, row_N,
                           last_N_B, b)
        self._aligned = (tokens, aligned)
        return aligned

    def _on_router(self, layer: int, tokens: TokenBatch, decision: RouterDecision) -> None:
        slot = self.stats.slot(layer)
        a = self._prepare(tokens)
        probs, idx, w = decision.probs_TE, decision.topk_idx_TK, decision.topk_w_TK
        if not a.all_valid:  # padding out of every statistic
            keep = a.keep_N.to(probs.device)
            probs, idx, w = probs.index_select(0, keep), idx.index_select(0, keep), w.index_select(0, keep)
        dev = self.stats.device
        self._pending[slot] = (probs.to(dev), idx.to(dev), w.to(dev))
        if len(self._pending) == self.stats.num_layers:
            self.flush_pending()  # every tracked layer of this forward is in: one update for all

    def flush_pending(self) -> None:
        """Fold the buffered router decisions of the current forward into the statistics."""
        if not self._pending or self._aligned is None:
            return
        a = self._aligned[1]
        slots = sorted(self._pending)
        probs_LNE = torch.stack([self._pending[s][0] for s in slots])
        idx_LNK = torch.stack([self._pending[s][1] for s in slots])
        w_LNK = torch.stack([self._pending[s][2] for s in slots])
        self._pending = {}
        Lb, N, E = probs_LNE.shape
        choices_LN2 = ranked_choices(probs_LNE.reshape(Lb * N, E), idx_LNK.reshape(Lb * N, -1),
                                     w_LNK.reshape(Lb * N, -1)).reshape(Lb, N, 2)
        set_LN = self.stats.update_layers(slots, a.ids_N, probs_LNE, idx_LNK, w_LNK, choices_LN2)
        self.stats.update_consecutive_layers(slots, choices_LN2, self._previous_choices(slots, a, choices_LN2))
        if self.pairs is not None:
            self.pairs.update_layers(slots, a.prev_ids_N, a.ids_N, idx_LNK, set_LN)

    def _previous_choices(self, slots: list[int], a: _Aligned, choices_LN2: torch.Tensor) -> torch.Tensor:
        """Choices of each valid row's previous valid token of the same sequence ((-1, -1) where none)."""
        B = a.batch_size
        none = choices_LN2.new_full((1, 1, 2), -1)
        prev = torch.where((a.prev_N >= 0)[None, :, None], choices_LN2[:, a.prev_N.clamp_min(0)], none)
        slot_L = torch.as_tensor(slots, dtype=torch.long, device=choices_LN2.device)
        carry = self._carry
        fits = carry is not None and carry.shape[1] == B
        if fits:
            prev = torch.where(a.continues_N[None, :, None], carry[slot_L][:, a.row_N], prev)
        # carry the last valid token's choices of every batch row to the next forward
        if not fits:
            carry = none.expand(self.stats.num_layers, B, 2).clone()
        if choices_LN2.shape[1]:
            last = choices_LN2[:, a.last_N_B.clamp_min(0)]
            carry[slot_L] = torch.where((a.last_N_B >= 0)[None, :, None], last, carry[slot_L])
        self._carry = carry
        return prev

    def attach(self) -> "RouterAnalyzer":
        self.recorder.attach()
        return self

    def detach(self) -> None:
        self.flush_pending()
        self.recorder.detach()
        self._carry = None
        self._aligned = None

    @contextlib.contextmanager
    def capturing(self) -> Iterator["RouterAnalyzer"]:
        """Accumulate statistics from every forward of the model inside the block."""
        attached = bool(self.recorder._handles)
        self.attach()
        try:
            yield self
        finally:
            self.flush_pending()
            if not attached:
                self.detach()

    # -- seed API ------------------------------------------------------------------------------
    @torch.no_grad()
    def analyze_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        with self.capturing():
            self.recorder.tracker.reset()  # every batch starts fresh sequences
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def get_vocabulary_analysis(self):
        """One row per (layer, token id) seen; columns of `var_moe.capture.schema`."""
        self.flush_pending()
        return stats_to_dataframe(self.stats, self.tokenizer)

    def get_pair_analysis(self):
        if self.pairs is None:
            raise InvalidInputError("pair statistics are off (track_pairs=False)")
        return self.pairs.to_dataframe()

    def reset(self) -> None:
        self.stats.reset()
        if self.pairs is not None:
            self.pairs.reset()
        self.padding_excluded = 0
        self._carry = None
        self._aligned = None
        self._pending = {}

    # -- output --------------------------------------------------------------------------------
    def metadata(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        self.flush_pending()
        cfg = self.model.config
        meta = {
            "model": str(getattr(cfg, "_name_or_path", "") or type(self.model).__name__),
            "model_type": getattr(cfg, "model_type", None),
            "num_tokens": self.stats.num_tokens,
            "padding_excluded": self.padding_excluded,
            "max_entropy_nats": math.log(self.stats.num_experts),
            "entropy_unit": "nats",
            "library_versions": library_versions(),
            "consecutive": self.stats.consecutive_rates(),
            "top1_definition": "chosen expert with the largest routing weight",
            "modal_set_count_exact": self.stats.set_err == 0,
            **self.stats.describe(),
        }
        return {**meta, **(extra or {})}

    def write_parquet(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write the statistics file (and the pair sidecar when pairs are tracked)."""
        meta = self.metadata(metadata)
        if self.pairs is not None:
            meta["pairs"] = self.pairs.describe()
        out = write_stats(self.get_vocabulary_analysis(), path, meta)
        if self.pairs is not None:
            write_pairs(self.pairs.to_dataframe(), pairs_path(path), meta)
        return out
