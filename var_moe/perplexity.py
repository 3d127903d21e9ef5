"""Held-out perplexity with padding masked, per document and overall, and a unigram baseline.

`sequence_nll(model, input_ids, attention_mask)` -> (nll_sum_B, count_B): summed next-token
negative log-likelihood (nats) and number of predicted tokens per row; padding never counts.
`corpus_perplexity(model, tokenizer, ...)` runs it over a corpus split; `unigram_perplexity`
scores the same targets with an add-one unigram model of the train split, the floor any LM must
beat. Test: `pytest tests/test_perplexity.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .corpus import iter_batches, iter_documents, tokenize_documents


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float  # nats
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(1, self.tokens)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.no_grad()
def sequence_nll(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL (float64, nats) and predicted-token counts; a target counts only when it
    and the token before it are real (not padding)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = attention_mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:]
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    # fp32 log-softmax: bf16 logits lose the small differences perplexity is made of
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.reshape(targets.shape).double() * keep
    return nll.sum(1).cpu(), keep.sum(1).cpu()


def corpus_perplexity(model: Any, tokenizer: Any, dataset: str = "stdlib", split: str = "test",
                      max_length: int = 256, batch_size: int = 8, num_samples: int | None = None) -> PerplexityResult:
    total, count = 0.0, 0
    for ids, mask in iter_batches(tokenizer, dataset, split, max_length, batch_size, num_samples):
        nll, n = sequence_nll(model, ids, mask)
        total += float(nll.sum())
        count += int(n.sum())
    return PerplexityResult(total, count)


def unigram_counts(tokenizer: Any, dataset: str = "stdlib", split: str = "train") -> torch.Tensor:
    vocab = len(tokenizer)
    counts = torch.zeros(vocab, dtype=torch.float64)
    for ids in tokenize_documents(tokenizer, iter_documents(dataset, split)):
        counts += torch.bincount(torch.tensor(ids), minlength=vocab).double()
    return counts


def unigram_perplexity(tokenizer: Any, train_counts: torch.Tensor, dataset: str = "stdlib", split: str = "test",
                       max_length: int = 256, batch_size: int = 8, num_samples: int | None = None) -> PerplexityResult:
    """Add-one unigram model of the train split scored on exactly the targets `corpus_perplexity` scores."""
    logp = torch.log((train_counts + 1) / (train_counts + 1).sum())
    total, count = 0.0, 0
    for ids, mask in iter_batches(tokenizer, dataset, split, max_length, batch_size, num_samples):
        keep = (mask[:, 1:] * mask[:, :-1]).bool()
        total += float(-(logp[ids[:, 1:]] * keep).sum())
        count += int(keep.sum())
    return PerplexityResult(total, count)
