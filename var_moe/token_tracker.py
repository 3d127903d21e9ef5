"""Token ids aligned with the rows a router sees, plus each token's preceding context.

A router module receives hidden states flattened to (T, H) with T = B x S in row-major order of
the batch's `input_ids` (B, S). Routers are never given token ids, so both the Phase 1 capture
and the VAR router need them from elsewhere: `TokenTracker` puts a forward pre-hook on the
decoder (`model.model`) that reads `input_ids`, `attention_mask` and the KV cache for every
forward and computes, vectorised over the batch:

- `ids_T`      token id of every row (long),
- `valid_T`    False for padding (taken from the attention mask),
- `context_TW` the W previous *valid* tokens of the same sequence (oldest first, -1 where the
               sequence has fewer), so `context_TW[:, -1]` is the previous token.

With a KV cache (`generate()`), each step sees only the new tokens; the tracker keeps the last W
valid tokens of every batch row between steps and resets them when a forward starts a fresh
sequence (empty cache). Context therefore never crosses batch rows or sequences.

Shapes: B batch, S new positions, T = B*S, W context window. Test: `pytest tests/test_token_tracker.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InvalidInputError


@dataclass
class TokenBatch:
    """What the tracker recorded for the forward in flight."""

    ids_T: torch.Tensor
    valid_T: torch.Tensor
    context_TW: torch.Tensor
    batch_size: int
    seq_len: int

    @property
    def prev_T(self) -> torch.Tensor:
        """Previous valid token of the same sequence, -1 at a sequence start."""
        if self.context_TW.shape[1] == 0:
            return torch.full_like(self.ids_T, -1)
        return self.context_TW[:, -1]


def _past_length(kwargs: dict[str, Any]) -> int:
    past = kwargs.get("past_key_values")
    if past is not None and hasattr(past, "get_seq_length"):
        try:
            return int(past.get_seq_length())
        except Exception:  # some cache types raise before the first update
            return 0
    cache_position = kwargs.get("cache_position")
    if cache_position is not None and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    return 0


def contexts_with_history(
    history_BW: torch.Tensor, ids_BS: torch.Tensor, valid_BS: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each new position, the `window` previous valid tokens (history first); new history.

    history_BW holds the last W valid tokens of each row before this chunk (-1 = none, right-aligned).
    Returns (context_BSW, new_history_BW). Vectorised: valid tokens are compacted per row with a
    cumulative count, then each position gathers the W entries before its own count.
    """
    b, s = ids_BS.shape
    w = window
    if w == 0:
        empty = ids_BS.new_full((b, s, 0), -1)
        return empty, history_BW
    if s == 1:
        return _one_step(history_BW, ids_BS, valid_BS)
    return _contexts_general(history_BW, ids_BS, valid_BS, w)


def _one_step(history_BW: torch.Tensor, ids_BS: torch.Tensor, valid_BS: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One new position per row (a decode step): its context is the history itself (the history
    holds the last valid tokens right-aligned, -1 on the left), and a valid token shifts into the
    history. Equal to `_contexts_general` for S = 1 (a test checks it) in 3 ops instead of ~25, no sync."""
    shifted_BW = torch.cat([history_BW[:, 1:], ids_BS], dim=1)
    return history_BW[:, None, :], torch.where(valid_BS.bool(), shifted_BW, history_BW)


def _contexts_general(history_BW: torch.Tensor, ids_BS: torch.Tensor, valid_BS: torch.Tensor, w: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    b, s = ids_BS.shape
    seq_BN = torch.cat([history_BW, ids_BS], dim=1)  # N = W + S
    ok_BN = torch.cat([history_BW >= 0, valid_BS.bool()], dim=1)
    n = seq_BN.shape[1]
    count_BN = torch.cumsum(ok_BN.long(), dim=1)  # valid tokens up to and including each position
    before_BN = count_BN - ok_BN.long()  # valid tokens strictly before each position
    # compact_BN[b, r] = r-th valid token of row b (slot n is a dump for invalid positions)
    compact = seq_BN.new_full((b, n + 1), -1)
    target = torch.where(ok_BN, count_BN - 1, torch.full_like(count_BN, n))
    compact.scatter_(1, target, seq_BN)
    compact = compact[:, :n]
    offs_W = torch.arange(-w, 0, device=ids_BS.device)
    pos_BSW = before_BN[:, w:, None] + offs_W  # indices into compact for the new positions
    gathered = torch.gather(compact, 1, pos_BSW.clamp_min(0).reshape(b, -1)).reshape(b, s, w)
    context_BSW = torch.where(pos_BSW >= 0, gathered, torch.full_like(gathered, -1))
    total_B = count_BN[:, -1]
    hist_idx_BW = total_B[:, None] + offs_W
    new_hist = torch.gather(compact, 1, hist_idx_BW.clamp_min(0))
    new_hist = torch.where(hist_idx_BW >= 0, new_hist, torch.full_like(new_hist, -1))
    return context_BSW, new_hist


class TokenTracker:
    """Forward pre-hook on a causal LM's decoder recording ids / padding / context per forward.

    Use as a context manager or call `attach()` / `detach()`. `current` is None outside a
    forward that passed `input_ids` (e.g. `inputs_embeds` only): consumers must then fall back.
    """

    def __init__(self, model: nn.Module, window: int = 1):
        if window < 0:
            raise InvalidInputError("window must be >= 0")
        self.model = model
        self.window = window
        self.current: TokenBatch | None = None
        self._history: torch.Tensor | None = None
        self._handle = None

    def _decoder(self) -> nn.Module:
        return getattr(self.model, "model", self.model)

    def attach(self) -> "TokenTracker":
        if self._handle is None:
            self._handle = self._decoder().register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.current = None
        self._history = None

    def __enter__(self) -> "TokenTracker":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def reset(self) -> None:
        self._history = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not torch.is_tensor(ids):
            self.current = None
            return
        ids_BS = ids.detach()
        b, s = ids_BS.shape
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == b:
            valid_BS = mask[:, -s:].detach().bool()  # generate() passes the mask of past + new tokens
        else:
            valid_BS = torch.ones_like(ids_BS, dtype=torch.bool)
        fresh = _past_length(kwargs) == 0
        if fresh or self._history is None or self._history.shape[0] != b:
            self._history = ids_BS.new_full((b, self.window), -1)
        context_BSW, self._history = contexts_with_history(self._history, ids_BS, valid_BS, self.window)
        self.current = TokenBatch(
            ids_T=ids_BS.reshape(-1),
            valid_T=valid_BS.reshape(-1),
            context_TW=context_BSW.reshape(b * s, self.window),
            batch_size=b,
            seq_len=s,
        )
