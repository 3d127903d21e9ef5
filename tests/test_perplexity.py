"""Perplexity masks padding: padded and unpadded rows give the same NLL; brute-force check."""

import math

import torch

from var_moe.perplexity import sequence_nll
from var_moe.tiny import tiny_model


def brute_nll(model, seq):
    logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(-float(logp[i, seq[i + 1]]) for i in range(len(seq) - 1)), len(seq) - 1


def test_padding_is_masked_and_matches_brute_force():
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    a, b = [5, 9, 13, 7, 22], [40, 41, 42]
    ids = torch.tensor([a, b + [0, 0]])
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    nll, n = sequence_nll(model, ids, mask)
    for row, seq in enumerate((a, b)):
        ref, cnt = brute_nll(model, seq)
        assert int(n[row]) == cnt
        assert math.isclose(float(nll[row]), ref, rel_tol=1e-5)
