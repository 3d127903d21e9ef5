"""Padded-batch decoding, the model-facing half of the engine (engine.py holds the queue and thread):
`BatchDecoder(model, rows, pad_id, eos_id)` runs `RowSpec`s of different lengths, sampling settings
and limits as one left-padded (B, S) prefill, then one (B, 1) step per new token.

- prefill: an attention mask and position ids counted over the valid tokens only (as `generate()`),
  so a row's logits do not depend on its neighbours. Prompt log-probabilities (perplexity, `echo`)
  come from this forward, the output layer applied to a bounded chunk of positions at a time.
- step: a finished row is fed a pad token with mask 0: it costs compute but is masked out of every
  routing statistic and never changes the live rows.
- admit: new rows are prefilled on their own, then their KV cache is left-padded to the batch's
  length and stacked under it; finished rows leave at the same moment. The size change restarts the
  VAR token tracker's per-row context for one step, which costs (previous, token) hits, never
  correctness. Only plain `DynamicLayer` caches stack; with any other (sliding windows) `can_admit`
  is False and batches run to completion.

Why (B, S) batches and not transformers' continuous batching: the VAR router and the capture align
token ids with router rows through (B, S) `input_ids`; continuous batching packs sequences into (1, T).

Sampling per row: temperature 0 is greedy, else softmax(logits / T) within the top_p nucleus, drawn
with the row's own seeded generator, so a seeded request gives the same text whatever its batch.
Reported log-probabilities are those of the unmodified model.

Shapes: B rows, S positions, C a chunk of positions, H hidden, V vocabulary, N top
log-probabilities. Test: `pytest tests/test_server_decode.py`.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from var_moe.loading import model_device

from .jobs import RowSpec, RowState

# Floats of output-layer logits computed at once for prompt log-probabilities (32 MB of float32):
# bounds the (B, C, V) chunk and its log-softmax copy whatever the batch, prompt and vocabulary.
LOGITS_CHUNK_ELEMS = 1 << 23


def nucleus_probs(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Sampling distribution per row: softmax(logits / T) restricted to the top_p nucleus."""
    probs_BV = torch.softmax(logits_BV / temperature_B.clamp_min(1e-6)[:, None], dim=-1)
    sorted_BV, order_BV = torch.sort(probs_BV, dim=-1, descending=True)
    mass_before_BV = torch.cumsum(sorted_BV, dim=-1) - sorted_BV
    keep_sorted_BV = mass_before_BV < top_p_B[:, None]
    # the most likely token always stays: a top_p that underflows float32 (1e-116 -> 0) would keep none
    keep_sorted_BV[:, 0] = True
    keep_BV = torch.zeros_like(keep_sorted_BV).scatter_(1, order_BV, keep_sorted_BV)
    probs_BV = torch.where(keep_BV, probs_BV, torch.zeros_like(probs_BV))
    return probs_BV / probs_BV.sum(-1, keepdim=True)


class BatchDecoder:
    """Runs one batch of rows; `prefill()` once, then `step()` until `done`."""

    # what each row has, in row order (rows leave in `drop_finished`, join in `admit_prefilled`)
    ROW_TENSORS = ("next_pos_B", "_last_B", "temperature_B", "top_p_B")
    ROW_LISTS = ("rows", "state", "generators")

    def __init__(self, model, rows: list[RowSpec], pad_id: int, eos_id: int | None):
        if not rows:
            raise ValueError("a batch needs at least one row")
        if any(len(r.prompt_ids) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        self.model = model
        self.rows = rows
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.device = model_device(model)
        self.state = [RowState() for _ in rows]
        seeds = [random.getrandbits(63) if r.seed is None else r.seed for r in rows]
        self.generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        self.temperature_B = torch.tensor([r.temperature for r in rows], dtype=torch.float32)
        self.top_p_B = torch.tensor([r.top_p for r in rows], dtype=torch.float32)
        self.cache = None
        self.mask_BS: torch.Tensor | None = None
        self.next_pos_B: torch.Tensor | None = None

    # -- helpers ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return all(s.finished for s in self.state)

    def finish(self, i: int, reason: str) -> None:
        """Mark row i finished (cancelled, timed out, stop string); its slot keeps idling."""
        if not self.state[i].finished:
            self.state[i].finished = True
            self.state[i].finish_reason = reason

    def _forward(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor, keep_all: bool) -> torch.Tensor:
        """Logits of the last position (B, V), or with keep_all the decoder's hidden states (B, S, H)
        (the output layer is then applied in chunks by `_prompt_logprobs`)."""
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        kwargs = {"input_ids": ids_BS.to(self.device), "attention_mask": self.mask_BS.to(self.device),
                  "position_ids": pos_BS.to(self.device), "past_key_values": self.cache, "use_cache": True}
        with torch.inference_mode():
            if keep_all and self._head() is not None:
                return self.model.get_decoder()(**kwargs).last_hidden_state
            out = self.model(**kwargs, logits_to_keep=0 if keep_all else 1)
        return out.logits.float().cpu()

    def _head(self):
        """The output layer when the model exposes decoder and head separately (every causal LM here)."""
        get_dec = getattr(self.model, "get_decoder", None)
        get_head = getattr(self.model, "get_output_embeddings", None)
        return get_head() if get_dec is not None and get_head is not None and get_dec() is not None else None

    def _choose(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """Next token per row (greedy rows by argmax, the others sampled with their generator)."""
        next_B = logits_BV.argmax(-1)
        sample = (self.temperature_B > 0).tolist()
        if any(sample):
            probs_BV = nucleus_probs(logits_BV, self.temperature_B, self.top_p_B)
            for i, on in enumerate(sample):  # a loop over batch rows (<= max batch), not tokens
                if on and not self.state[i].finished:
                    next_B[i] = torch.multinomial(probs_BV[i], 1, generator=self.generators[i])[0]
        return next_B

    def _emit(self, logits_BV: torch.Tensor) -> list[int | None]:
        """Pick and record the next token of every live row; returns the new ids (None if idle)."""
        next_B = self._choose(logits_BV)
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
        chosen_B = logp_BV.gather(1, next_B[:, None])[:, 0]
        n_top = max(r.top_logprobs for r in self.rows)
        tops = None
        if n_top:
            vals_BN, idx_BN = torch.topk(logp_BV, n_top, dim=-1)
            tops = [list(zip(i.tolist(), v.tolist())) for i, v in zip(idx_BN, vals_BN)]
        emitted: list[int | None] = []
        for i, (row, st) in enumerate(zip(self.rows, self.state)):
            if st.finished or len(st.new_ids) >= row.max_new_tokens:
                if not st.finished:
                    self.finish(i, "length")
                emitted.append(None)
                continue
            tok = int(next_B[i])
            st.new_ids.append(tok)
            st.new_logprobs.append(float(chosen_B[i]))
            if row.top_logprobs:
                st.new_top.append(tops[i][: row.top_logprobs])
            emitted.append(tok)
            if self.eos_id is not None and tok == self.eos_id:
                self.finish(i, "eos")
            elif len(st.new_ids) >= row.max_new_tokens:
                self.finish(i, "length")
        self._last_B = next_B
        return emitted

    # -- the two phases ----------------------------------------------------------------------
    def prefill(self) -> list[int | None]:
        """Forward the left-padded prompts; returns each row's first new token (None if none)."""
        lengths = [len(r.prompt_ids) for r in self.rows]
        b, s = len(self.rows), max(lengths)
        ids_BS = torch.full((b, s), self.pad_id, dtype=torch.long)
        self.mask_BS = torch.zeros((b, s), dtype=torch.long)
        for i, r in enumerate(self.rows):  # copy each prompt into its row (B rows)
            ids_BS[i, s - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            self.mask_BS[i, s - len(r.prompt_ids):] = 1
        pos_BS = (self.mask_BS.cumsum(-1) - 1).clamp_min(0)
        self.next_pos_B = pos_BS[:, -1] + 1
        want_prompt = any(r.prompt_logprobs for r in self.rows)
        out = self._forward(ids_BS, pos_BS, keep_all=want_prompt)
        for st, n in zip(self.state, lengths):
            st.forwarded_tokens += n
        last_BV = self._prompt_logprobs(ids_BS, out) if want_prompt else out[:, -1]
        return self._emit(last_BV)

    def _prompt_logprobs(self, ids_BS: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Record log p(prompt[i] | prompt[:i]) (+ top-N) per row; returns the last position's logits.
        `out` is (B, S, H) hidden states, put through the output layer C positions at a time (a loop over
        chunks, not tokens), or the (B, S, V) logits of a model without a separate head."""
        head = self._head()
        b, s = ids_BS.shape
        n_top = max((r.top_logprobs for r in self.rows if r.prompt_logprobs), default=0)
        lp_BS = torch.zeros(b, s - 1)
        top_val_BSN = torch.zeros(b, s - 1, n_top)
        top_idx_BSN = torch.zeros(b, s - 1, n_top, dtype=torch.long)
        vocab = int(self.model.config.vocab_size)
        c = max(1, LOGITS_CHUNK_ELEMS // max(1, b * vocab))

        def logits_of(a: int, z: int) -> torch.Tensor:
            if head is None:
                return out[:, a:z].float().cpu()
            with torch.inference_mode():
                return head(out[:, a:z]).float().cpu()

        for a in range(0, s - 1, c):
            z = min(s - 1, a + c)
            logp_BCV = torch.log_softmax(logits_of(a, z), dim=-1)
            lp_BS[:, a:z] = logp_BCV.gather(2, ids_BS[:, a + 1:z + 1, None])[..., 0]
            if n_top:
                top_val_BSN[:, a:z], top_idx_BSN[:, a:z] = torch.topk(logp_BCV, n_top, dim=-1)
            del logp_BCV
        for i, (row, st) in enumerate(zip(self.rows, self.state)):
            if not row.prompt_logprobs:
                continue
            start = s - len(row.prompt_ids)  # first real position; its token has no prediction
            st.prompt_logprobs = [None] + lp_BS[i, start:].tolist()
            if row.top_logprobs:
                n = row.top_logprobs
                idx, val = top_idx_BSN[i, start:, :n].tolist(), top_val_BSN[i, start:, :n].tolist()
                st.prompt_top = [None] + [list(zip(ii, vv)) for ii, vv in zip(idx, val)]
        return logits_of(s - 1, s)[:, -1]

    def step(self) -> list[int | None]:
        """One decode step for the whole batch; returns each row's new token (None if idle)."""
        live_B = torch.tensor([not st.finished for st in self.state])
        ids_B1 = torch.where(live_B, self._last_B, torch.full_like(self._last_B, self.pad_id))[:, None]
        self.mask_BS = torch.cat([self.mask_BS, live_B.long()[:, None]], dim=1)
        pos_B1 = self.next_pos_B[:, None].clone()
        self.next_pos_B = self.next_pos_B + live_B.long()
        logits = self._forward(ids_B1, pos_B1, keep_all=False)
        for st, live in zip(self.state, live_B.tolist()):
            st.forwarded_tokens += int(live)
        return self._emit(logits[:, -1])

    # -- rows joining and leaving a running batch ---------------------------------------------
    @property
    def can_admit(self) -> bool:
        """True once prefilled, when every cache layer is a plain growing one (stackable by row)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def drop_finished(self) -> list[int]:
        """Take finished rows out of the batch (cache, mask, per-row settings); returns the kept
        indices in their old numbering. Leading positions no kept row uses are cut off too."""
        keep = [i for i, st in enumerate(self.state) if not st.finished]
        if len(keep) == len(self.state):
            return keep
        idx_B = torch.tensor(keep, dtype=torch.long)
        self.mask_BS = self.mask_BS[idx_B]
        used_S = self.mask_BS.any(0).nonzero()
        first = int(used_S[0]) if len(used_S) else self.mask_BS.shape[1]
        self.mask_BS = self.mask_BS[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx_B.to(layer.keys.device), :, first:]
            layer.values = layer.values[idx_B.to(layer.values.device), :, first:]
        for name in self.ROW_TENSORS:
            setattr(self, name, getattr(self, name)[idx_B])
        for name in self.ROW_LISTS:
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        return keep

    def admit(self, rows: list[RowSpec]) -> list[int | None]:
        """Prefill `rows` on their own and stack them under the running batch (after its rows);
        returns the first new token of every row of the grown batch (None for the old rows)."""
        sub = BatchDecoder(self.model, rows, self.pad_id, self.eos_id)
        first = sub.prefill()
        old = len(self.rows)
        self.admit_prefilled(sub)
        return [None] * old + first

    def admit_prefilled(self, sub: BatchDecoder) -> None:
        """Stack the rows of `sub` (prefilled, not stepped) under this batch's rows."""
        if not (self.can_admit and sub.can_admit):
            raise RuntimeError("this batch's cache cannot take new rows")
        sa, sb = self.mask_BS.shape[1], sub.mask_BS.shape[1]
        s = max(sa, sb)
        # left-padded with zeros to the longer of the two: positions are the last dimension of the
        # mask (B, S) and the second last of the cache's keys and values (B, heads, S, head_dim)
        self.mask_BS = torch.cat([F.pad(self.mask_BS, (s - sa, 0)), F.pad(sub.mask_BS, (s - sb, 0))], 0)
        for mine, theirs in zip(self.cache.layers, sub.cache.layers):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, s - sa, 0)), F.pad(theirs.keys, (0, 0, s - sb, 0))], 0)
            mine.values = torch.cat([F.pad(mine.values, (0, 0, s - sa, 0)), F.pad(theirs.values, (0, 0, s - sb, 0))], 0)
        for name in self.ROW_TENSORS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(sub, name)]))
        for name in self.ROW_LISTS:
            setattr(self, name, getattr(self, name) + getattr(sub, name))
