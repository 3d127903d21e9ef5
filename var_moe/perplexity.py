"""Held-out perplexity with padding masked, per document and overall, and a unigram baseline.

`token_nll(model, input_ids, attention_mask, score_from_B)` -> (nll_BS, keep_BS): next-token negative
log-likelihood (nats) of every scored position, padding never counted, sliding-window context
excluded; `sequence_nll` sums it per row.
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
def token_nll(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_from_B: torch.Tensor | None = None,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL of every target position 1..S-1 (nats, float64, [B, S-1], 0 where not scored)
    and which positions are scored: the target and the token before it are real (not padding) and,
    with `score_from_B` (sliding windows), the target is at or after that position of its row
    (earlier ones are context). The one NLL computation of the project (evaluation, sweep, server
    checks and benchmarks all call it). `device`: where `model` runs (default: its parameters')."""
    device = device if device is not None else next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    # fp32 log-softmax: bf16 logits lose the small differences perplexity is made of
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    if score_from_B is not None:
        pos_S = torch.arange(1, ids.shape[1], device=device)
        keep &= pos_S[None, :] >= score_from_B.to(device)[:, None]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return (nll.reshape(keep.shape).double() * keep).cpu(), keep.cpu()


def sequence_nll(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL (float64, nats) and predicted-token counts (`token_nll` summed over positions)."""
    nll, keep = token_nll(model, input_ids, attention_mask)
    return nll.sum(1), keep.sum(1)


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
