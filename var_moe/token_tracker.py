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
sequence (empty cache). Context therefore never crosses batch rows or sequences. One new token of
one sequence on CPU (batch-1 decoding) is read as host ints and the history kept as a tuple, with
no tensor op at all; its `TokenBatch` builds tensors only when read (`TokenBatch.one`). After each
forward is recorded, `on_batch` (if set) is called with it.

Shapes: B batch, S new positions, T = B*S, W context window. Test: `pytest tests/test_token_tracker.py`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import InvalidInputError


class TokenBatch:
    """What the tracker recorded for the forward in flight: `ids_T`, `valid_T`, `context_TW` (see
    the module docstring), `batch_size`, `seq_len` and `rows` (= T).

    A one-row CPU decode step (`TokenBatch.one_step`) also carries `one` = (token id, valid,
    context tuple) as host values and builds the tensors only when something reads them: each
    small tensor op costs several microseconds inside a decode step, and the VAR router's step
    for a token without entries reads none of them."""

    __slots__ = ("_ids_T", "_valid_T", "_context_TW", "batch_size", "seq_len", "rows", "one", "_src_BS")

    def __init__(self, ids_T: torch.Tensor | None, valid_T: torch.Tensor | None, context_TW: torch.Tensor | None,
                 batch_size: int, seq_len: int):
        self._ids_T, self._valid_T, self._context_TW = ids_T, valid_T, context_TW
        self.batch_size, self.seq_len, self.rows = batch_size, seq_len, batch_size * seq_len
        self.one: tuple[int, bool, tuple[int, ...]] | None = None
        self._src_BS: torch.Tensor | None = None

    @classmethod
    def one_step(cls, ids_BS: torch.Tensor, token: int, valid: bool, context: tuple[int, ...]) -> "TokenBatch":
        """A (1, 1) CPU step: host values now, tensors on first read."""
        batch = cls(None, None, None, 1, 1)
        batch.one, batch._src_BS = (token, valid, context), ids_BS
        return batch

    @property
    def ids_T(self) -> torch.Tensor:
        if self._ids_T is None:
            self._ids_T = self._src_BS.reshape(-1)
        return self._ids_T

    @property
    def valid_T(self) -> torch.Tensor:
        if self._valid_T is None:
            self._valid_T = torch.tensor([self.one[1]], dtype=torch.bool)
        return self._valid_T

    @property
    def context_TW(self) -> torch.Tensor:
        if self._context_TW is None:
            self._context_TW = torch.tensor([self.one[2]], dtype=self._src_BS.dtype).reshape(1, len(self.one[2]))
        return self._context_TW

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
        # (B, W) tensor, or a tuple of W host ints after a one-row CPU step (`_host_step`)
        self._history: torch.Tensor | tuple[int, ...] | None = None
        # called with `current` (None included) as each forward starts, after it is recorded (the
        # VAR wrapper resolves a batch-1 decode step's tables there, once per forward)
        self.on_batch: Callable[[TokenBatch | None], None] | None = None
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
        self._record(args, kwargs)
        if self.on_batch is not None:
            self.on_batch(self.current)

    def _record(self, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not torch.is_tensor(ids):
            self.current = None
            return
        b, s = ids.shape
        mask = kwargs.get("attention_mask")
        has_mask = torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == b
        fresh = _past_length(kwargs) == 0
        if b == 1 and s == 1 and not fresh and self._history is not None and ids.device.type == "cpu" \
                and (not has_mask or mask.device.type == "cpu"):
            self._host_step(ids, mask if has_mask else None)  # integer ids never need a detach
            return
        ids_BS = ids.detach()
        if isinstance(self._history, tuple):  # kept on the host by one-row steps
            self._history = ids_BS.new_tensor([self._history]).reshape(1, self.window)
        if has_mask:
            valid_BS = mask[:, -s:].detach().bool()  # generate() passes the mask of past + new tokens
        else:
            valid_BS = torch.ones_like(ids_BS, dtype=torch.bool)
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

    def _host_step(self, ids_BS: torch.Tensor, mask: torch.Tensor | None) -> None:
        """One new token of one sequence on CPU (batch-1 decoding): the history is a tuple of host
        ints, read and shifted without tensor ops (`.numpy()` of a CPU tensor shares its memory and
        dispatches nothing). Same result as `contexts_with_history` (a test checks it)."""
        hist = self._history
        if not isinstance(hist, tuple):  # after a prefill; another batch size starts over, as below
            hist = tuple(int(x) for x in hist[0].tolist()) if hist.shape[0] == 1 else (-1,) * self.window
        token = int(ids_BS.numpy()[0, 0])
        valid = True if mask is None else bool((mask.detach() if mask.requires_grad else mask).numpy()[0, -1])
        self._history = (hist[1:] + (token,)) if valid and self.window else hist
        self.current = TokenBatch.one_step(ids_BS, token, valid, hist)
