"""Held-out text for evaluations: documents cut into pieces or sliding windows, in padded batches
that keep each row's document index (the unit of every bootstrap over documents).

- `eval_batches`: back-to-back pieces of <= max_length tokens (no overlap: the first tokens of each
  piece have little context). The routing evidence and the timed passes use these.
- `sliding_batches`: the perplexity criterion's scoring. Each document is cut into windows of
  max_length tokens advancing by `stride`; the first window scores all its tokens, every later one
  only the tokens the previous window did not reach (its last `stride`, fewer at the document's
  end), each conditioned on at least max_length - stride preceding tokens. With stride <
  max_length every token of a document but its first is scored exactly once; with stride ==
  max_length this is the piece scoring (the first token of each piece is never a target).
  `EvalBatch.score_from_B` marks where each row's scored targets begin.

Used by evaluate.py, tables.py (evidence passes) and the sweep; it sits below them so none of those
imports another to get its inputs.
Test: `pytest tests/test_var_sliding.py tests/test_var_eval.py tests/test_loading_corpus.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from ..corpus import chunk_sequences, encode_document, iter_documents, pad_batch
from ..errors import InvalidInputError


@dataclass
class EvalBatch:
    ids: torch.Tensor
    mask: torch.Tensor
    doc_B: list[int]  # document index of each row (for the bootstrap over documents)
    # sliding windows only: first token position of each row that is a scored target (earlier
    # positions are context), and each row's start position in its document
    score_from_B: torch.Tensor | None = None
    start_B: list[int] | None = None

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def eval_batches(tokenizer: Any, dataset: str, split: str, num_samples: int | None, max_length: int,
                 batch_size: int, max_per_doc: int | None = 1, max_docs: int | None = None) -> list[EvalBatch]:
    """`document_batches` over the split's documents (at most `max_docs`), by default one piece per
    document so a sample spans many documents (`max_per_doc` None: every piece)."""
    if max_per_doc is not None and max_per_doc < 1:
        raise InvalidInputError("--max-per-doc must be >= 1")
    docs = ((d, encode_document(tokenizer, doc.text)) for d, doc in enumerate(iter_documents(dataset, split, max_docs)))
    out = document_batches(tokenizer, docs, max_length, batch_size, max_per_doc, num_samples)
    if not out:
        raise InvalidInputError(f"--dataset {dataset!r} --split {split!r} gave no sequences to evaluate")
    return out


def document_batches(tokenizer: Any, token_lists: Iterable[tuple[int, list[int]]], max_length: int, batch_size: int,
                     max_per_doc: int | None = None, num_samples: int | None = None) -> list[EvalBatch]:
    """(document index, token ids) -> padded batches of the <= max_length pieces of each document
    (its first `max_per_doc`; at most `num_samples` in all), rows keeping their document index."""
    pieces = ([(d, piece) for piece in islice(chunk_sequences([ids], max_length), max_per_doc)]
              for d, ids in token_lists)
    return _padded(pieces, num_samples, batch_size, tokenizer.pad_token_id or 0)


def _padded(rows_per_doc: Iterable[list[tuple[Any, ...]]], limit: int | None, batch_size: int,
            pad_id: int) -> list[EvalBatch]:
    """The rows of each document, at most `limit` in all, in padded batches: (document, ids) pieces,
    or (document, start, first scored position, ids) sliding windows. Documents are read (and
    encoded) lazily, so none is read past the last one needed."""
    rows: list[tuple[Any, ...]] = []
    for doc_rows in rows_per_doc:
        rows += doc_rows
        if limit is not None and len(rows) >= limit:
            break
    rows = rows[:limit]
    out = []
    for i in range(0, len(rows), batch_size):  # a loop over batches, not tokens
        chunk = rows[i : i + batch_size]
        ids_BS, mask_BS = pad_batch([r[-1] for r in chunk], pad_id)
        window = (torch.tensor([r[2] for r in chunk]), [r[1] for r in chunk]) if len(chunk[0]) == 4 else ()
        out.append(EvalBatch(ids_BS, mask_BS, [r[0] for r in chunk], *window))
    return out


def window_starts(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int]]:
    """(start in the document, first scored position in the window) of each sliding window over a
    document of `n_tokens` tokens; windows with no scored target are left out."""
    check_stride(max_length, stride)
    out = [(0, 1)] if n_tokens >= 2 else []
    start = 0
    while start + max_length < n_tokens:  # a loop over windows, not tokens
        start += stride
        first = max_length - stride  # the previous window ends there
        if min(max_length, n_tokens - start) > max(first, 1):
            out.append((start, first))
    return out


def check_stride(max_length: int, stride: int) -> None:
    if max_length < 2:
        raise InvalidInputError(f"--max-length must be at least 2, got {max_length}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise InvalidInputError(f"--stride must be an integer in [1, --max-length = {max_length}], got {stride!r}")


def sliding_batches(tokenizer: Any, dataset: str, split: str, max_length: int, stride: int, batch_size: int,
                    max_docs: int | None = None, max_windows_per_doc: int | None = None,
                    num_windows: int | None = None) -> list[EvalBatch]:
    """Whole documents of the split (at most `max_docs`; the first `max_windows_per_doc` windows of
    each; at most `num_windows` in all) as sliding windows (module docstring) in padded batches."""
    if max_docs is not None and max_docs < 1:
        raise InvalidInputError(f"--num-docs must be >= 1, got {max_docs}")
    docs = (encode_document(tokenizer, doc.text) for doc in iter_documents(dataset, split, limit=max_docs))
    pad_id = tokenizer.pad_token_id or 0
    out = window_batches(docs, max_length, stride, batch_size, pad_id, max_windows_per_doc, num_windows)
    if not out:
        raise InvalidInputError(f"--dataset {dataset!r} --split {split!r} gave no windows to evaluate")
    return out


def window_batches(token_lists: Iterable[list[int]], max_length: int, stride: int, batch_size: int, pad_id: int,
                   max_windows_per_doc: int | None = None, num_windows: int | None = None) -> list[EvalBatch]:
    """Sliding windows over token id lists (document index = position in `token_lists`), batched."""
    check_stride(max_length, stride)
    for flag, v in (("--batch-size", batch_size), ("--max-per-doc", max_windows_per_doc), ("--num-samples", num_windows)):
        if v is not None and v < 1:
            raise InvalidInputError(f"{flag} must be >= 1, got {v}")
    windows = ([(d, start, first, ids[start : start + max_length])
                for start, first in window_starts(len(ids), max_length, stride)[:max_windows_per_doc]]
               for d, ids in enumerate(token_lists))
    return _padded(windows, num_windows, batch_size, pad_id)


def scoring_info(batches: list[EvalBatch], max_length: int, stride: int | None) -> dict[str, Any]:
    """What a result JSON says about how its perplexity was scored."""
    sliding = stride is not None and stride < max_length  # stride == window scores exactly the pieces
    return {"method": "sliding windows" if sliding else "back-to-back pieces", "window": max_length,
            "stride": stride if sliding else max_length, "rows": sum(len(b.doc_B) for b in batches),
            "documents": len({d for b in batches for d in b.doc_B}), "tokens_fed": sum(b.tokens for b in batches)}
