"""Padded-batch decoding (server/decode.py) against brute-force references on a tiny model.

Run: `pytest tests/test_server_decode.py` (seconds, CPU).
"""

from __future__ import annotations

import pytest
import torch

from server.decode import BatchDecoder, RowSpec, nucleus_probs
from var_moe.perplexity import sequence_nll
from var_moe.tiny import tiny_model

torch.set_num_threads(1)
PAD = 0


@pytest.fixture(scope="module")
def model():
    return tiny_model("mixtral", seed=3)


def run(model, rows, eos=None):
    dec = BatchDecoder(model, rows, PAD, eos)
    dec.prefill()
    while not dec.done:
        dec.step()
    return dec.state


def test_greedy_matches_generate(model):
    prompt = [5, 17, 33, 8, 90, 41]
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    (st,) = run(model, [RowSpec(prompt, 12)])
    assert st.new_ids == ref[0, len(prompt):].tolist()
    assert st.finish_reason == "length" and st.forwarded_tokens == len(prompt) + 11


def test_padded_rows_equal_solo_rows(model):
    """Left padding, masks and per-row positions: a row's result does not depend on its neighbours."""
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], list(range(20, 45))]
    limits = [10, 3, 7]  # a short row finishes early and idles masked while the others go on
    batch = run(model, [RowSpec(p, n, prompt_logprobs=True) for p, n in zip(prompts, limits)])
    for p, n, st in zip(prompts, limits, batch):
        (solo,) = run(model, [RowSpec(p, n, prompt_logprobs=True)])
        assert st.new_ids == solo.new_ids
        torch.testing.assert_close(torch.tensor(st.prompt_logprobs[1:]), torch.tensor(solo.prompt_logprobs[1:]),
                                   atol=1e-4, rtol=1e-4)
        assert st.prompt_logprobs[0] is None and len(st.prompt_logprobs) == len(p)


def test_prompt_logprobs_match_perplexity_reference(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 50]]
    batch = run(model, [RowSpec(p, 0, prompt_logprobs=True) for p in prompts])
    for p, st in zip(prompts, batch):
        nll, count = sequence_nll(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))
        assert int(count[0]) == len(p) - 1
        assert -sum(st.prompt_logprobs[1:]) == pytest.approx(float(nll[0]), rel=1e-4)
        assert st.new_ids == [] and st.finish_reason == "length"


def test_top_logprobs_are_the_largest(model):
    (st,) = run(model, [RowSpec([5, 6, 7, 8], 3, prompt_logprobs=True, top_logprobs=3)])
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits[0].float()
    ref = torch.log_softmax(logits, -1).topk(3, -1)
    got = st.prompt_top[1:]  # predictions of positions 1..3 come from logits 0..2
    for pos, pairs in enumerate(got):
        assert [i for i, _ in pairs] == ref.indices[pos].tolist()
    assert st.new_logprobs[0] == pytest.approx(float(ref.values[3, 0]), abs=1e-5)  # greedy: chosen = best


def test_seeded_sampling_does_not_depend_on_batch(model):
    spec = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    (solo,) = run(model, [RowSpec([5, 6, 7], **spec)])
    batch = run(model, [RowSpec([9, 9, 9, 9, 9], 10, 1.0, seed=1), RowSpec([5, 6, 7], **spec)])
    assert batch[1].new_ids == solo.new_ids


def test_eos_stops_a_row(model):
    (ref,) = run(model, [RowSpec([5, 6, 7], 8)])
    eos = ref.new_ids[2]
    (st,) = run(model, [RowSpec([5, 6, 7], 8)], eos=eos)
    first = ref.new_ids.index(eos)
    assert st.new_ids == ref.new_ids[: first + 1] and st.finish_reason == "eos"


def test_nucleus_matches_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    temp = torch.tensor([0.5, 1.0, 2.0, 1.0])
    top_p = torch.tensor([0.3, 0.9, 1.0, 0.05])
    got = nucleus_probs(logits, temp, top_p)
    for b in range(4):  # reference: smallest prefix of the sorted distribution reaching top_p
        p = torch.softmax(logits[b] / temp[b], -1)
        order = torch.argsort(p, descending=True)
        keep, mass = [], 0.0
        for i in order.tolist():
            keep.append(i)
            mass += float(p[i])
            if mass >= float(top_p[b]) - 1e-7:
                break
        ref = torch.zeros_like(p)
        ref[keep] = p[keep] / p[keep].sum()
        torch.testing.assert_close(got[b], ref, atol=1e-6, rtol=1e-5)
