"""Nucleus sampling keeps a valid distribution at the edges of its parameters (found by fuzzing)."""

import torch

from server.decode import nucleus_probs


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 5.0, 0.0]])
    probs = nucleus_probs(logits, torch.tensor([1.0, 0.7]), torch.tensor([7.2e-116, 1e-45]))
    assert torch.isfinite(probs).all()
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    assert float(probs[1].sum()) == 1.0 and float(probs[1].max()) == 1.0


def test_full_top_p_is_plain_softmax():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.8)
    torch.testing.assert_close(nucleus_probs(logits, t, torch.ones(4)), torch.softmax(logits / 0.8, -1))
