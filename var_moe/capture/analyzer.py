"""RouterAnalyzer: hooks a model's real routers and accumulates Phase 1 routing statistics.

Seed API kept: `RouterAnalyzer(model, layer_indices=None)`, `analyze_batch(input_ids,
attention_mask)`, `get_vocabulary_analysis() -> DataFrame`. Underneath, a `RoutingRecorder`
hands every router call's float32 decision and the aligned `TokenBatch` to
`StreamingTokenStats` (per layer and token) and `PairStats` ((previous, token) -> top-k set).
Padding rows (attention mask 0) are dropped before any statistic. Memory is O(L x V x E) plus
the bounded pair table, independent of the number of tokens.

A server can accumulate statistics from its own forwards, `generate()` decode steps included:
    with analyzer.capturing():
        model.generate(...)
Consecutive-token pairs cross forwards only where the tracker says the sequence continues (a
decode step); the previous token's choices are carried per batch row for that.

Test: `pytest tests/test_capture_stats.py`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..adapters import RouterDecision, get_adapter
from ..token_tracker import TokenBatch
from .pairs import DEFAULT_CAPACITY, PairStats
from .recorder import RoutingRecorder
from .schema import library_versions, pairs_path, write_pairs, write_stats
from .streaming_stats import StreamingTokenStats, previous_rows, ranked_choices


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
        self._carry: list[torch.Tensor | None] = [None] * len(layers)  # (B, 2) last choices per batch row

    # -- hooks ---------------------------------------------------------------------------------
    def _on_router(self, layer: int, tokens: TokenBatch, decision: RouterDecision) -> None:
        slot = self.stats.slot(layer)
        valid_T = tokens.valid_T.to(self.stats.device)
        if slot == 0:
            self.padding_excluded += int((~valid_T).sum())
        ids_T = tokens.ids_T.to(self.stats.device)
        probs_TE, idx_TK, w_TK = decision.probs_TE, decision.topk_idx_TK, decision.topk_w_TK
        choices_T2 = ranked_choices(probs_TE, idx_TK, w_TK).to(self.stats.device)
        self.stats.update(slot, ids_T[valid_T], probs_TE[valid_T], idx_TK[valid_T], w_TK[valid_T], choices_T2[valid_T])
        prev_choices_T2 = self._previous_choices(slot, tokens, valid_T, choices_T2)
        self.stats.update_consecutive(slot, choices_T2[valid_T], prev_choices_T2[valid_T])
        if self.pairs is not None:
            self.pairs.update(slot, tokens.prev_T.to(self.stats.device)[valid_T], ids_T[valid_T], idx_TK[valid_T])

    def _previous_choices(self, slot: int, tokens: TokenBatch, valid_T: torch.Tensor, choices_T2: torch.Tensor) -> torch.Tensor:
        """Choices of each row's previous valid token of the same sequence ((-1, -1) where none)."""
        b, s = tokens.batch_size, tokens.seq_len
        valid_BS = valid_T.reshape(b, s)
        prev_row_T = previous_rows(valid_BS)
        none = choices_T2.new_full((1, 2), -1)
        prev_choices = torch.where((prev_row_T >= 0)[:, None], choices_T2[prev_row_T.clamp_min(0)], none)
        carry = self._carry[slot]
        # first valid token of a row whose sequence continues from an earlier forward (decode step)
        continues_T = (prev_row_T < 0) & (tokens.prev_T.to(prev_row_T.device) >= 0)
        if carry is not None and carry.shape[0] == b:
            row_T = torch.arange(b, device=prev_row_T.device).repeat_interleave(s)
            prev_choices = torch.where(continues_T[:, None], carry[row_T], prev_choices)
        # carry the last valid token's choices of every row to the next forward
        pos_BS = torch.arange(s, device=valid_BS.device).expand(b, s)
        last_B = torch.where(valid_BS, pos_BS, torch.full_like(pos_BS, -1)).max(dim=1).values
        last_choices = choices_T2.reshape(b, s, 2)[torch.arange(b, device=valid_BS.device), last_B.clamp_min(0)]
        keep = carry if carry is not None and carry.shape[0] == b else none.expand(b, 2)
        self._carry[slot] = torch.where((last_B >= 0)[:, None], last_choices, keep)
        return prev_choices

    def attach(self) -> "RouterAnalyzer":
        self.recorder.attach()
        return self

    def detach(self) -> None:
        self.recorder.detach()
        self._carry = [None] * len(self._carry)

    @contextlib.contextmanager
    def capturing(self) -> Iterator["RouterAnalyzer"]:
        """Accumulate statistics from every forward of the model inside the block."""
        attached = bool(self.recorder._handles)
        self.attach()
        try:
            yield self
        finally:
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
        return self.stats.to_dataframe(self.tokenizer)

    def get_pair_analysis(self):
        if self.pairs is None:
            raise ValueError("pair statistics are off (track_pairs=False)")
        return self.pairs.to_dataframe()

    def reset(self) -> None:
        self.stats.reset()
        if self.pairs is not None:
            self.pairs.reset()
        self.padding_excluded = 0
        self._carry = [None] * len(self._carry)

    # -- output --------------------------------------------------------------------------------
    def metadata(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
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
            "modal_set_count_exact": self.stats.exact_sets,
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
