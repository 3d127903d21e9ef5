"""Held-out text for evaluations: documents cut into pieces, in padded batches that keep each row's
document index (the unit of every bootstrap over documents).

Used by the evaluation (evaluate.py), the tables' evidence pass (tables.py) and the sweep; it sits
below them so none of those imports another to get its inputs.
Test: `pytest tests/test_var_eval.py tests/test_loading_corpus.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..corpus import chunk_sequences, encode_document, iter_documents, pad_batch
from ..errors import InvalidInputError


@dataclass
class EvalBatch:
    ids: torch.Tensor
    mask: torch.Tensor
    doc_B: list[int]  # document index of each row (for the bootstrap over documents)

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def eval_batches(tokenizer: Any, dataset: str, split: str, num_samples: int | None, max_length: int,
                 batch_size: int, max_per_doc: int | None = 1, max_docs: int | None = None) -> list[EvalBatch]:
    """Held-out sequences (documents cut into <= max_length pieces, at most `max_per_doc` per
    document so a sample spans many documents; None = whole documents; at most `max_docs`
    documents) in padded batches with doc ids."""
    if max_per_doc is not None and max_per_doc < 1:
        raise InvalidInputError("--max-per-doc must be >= 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs: list[tuple[int, list[int]]] = []
    for d, doc in enumerate(iter_documents(dataset, split)):
        if max_docs is not None and d >= max_docs:
            break
        ids = encode_document(tokenizer, doc.text)  # whole document, chunked below: no length warning
        for j, piece in enumerate(chunk_sequences([ids], max_length)):
            if max_per_doc is not None and j >= max_per_doc:
                break
            seqs.append((d, piece))
            if num_samples is not None and len(seqs) >= num_samples:
                break
        if num_samples is not None and len(seqs) >= num_samples:
            break
    if not seqs:
        raise InvalidInputError(f"--dataset {dataset!r} --split {split!r} gave no sequences to evaluate")
    out = []
    for i in range(0, len(seqs), batch_size):  # a loop over batches, not tokens
        chunk = seqs[i : i + batch_size]
        ids, mask = pad_batch([s for _, s in chunk], pad_id)
        out.append(EvalBatch(ids, mask, [d for d, _ in chunk]))
    return out
