"""Padded-batch decoding (server/decode.py) against brute-force references on a tiny model.

Run: `pytest tests/test_server_decode.py` (seconds, CPU).
"""

from __future__ import annotations

import pytest
import torch

from server.decode import BatchDecoder, nucleus_probs
from server.jobs import RowSpec
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


def test_admitted_rows_equal_solo_rows(model):
    """Rows joining a running batch (and finished rows leaving it) give what they give alone."""
    first = [RowSpec([5, 6, 7, 8, 9], 12), RowSpec([3, 4], 2)]
    later = [RowSpec(list(range(20, 31)), 6, prompt_logprobs=True, top_logprobs=2), RowSpec([7, 7], 9, 1.0, seed=7)]
    dec = BatchDecoder(model, first, PAD, None)
    dec.prefill()
    for _ in range(3):
        dec.step()
    assert dec.state[1].finished and dec.can_admit
    kept = dec.drop_finished()
    assert kept == [0] and len(dec.rows) == 1
    emitted = dec.admit(later)
    assert emitted[0] is None and all(t is not None for t in emitted[1:])
    while not dec.done:
        dec.step()
    for spec, st in zip([first[0]] + later, dec.state):
        (solo,) = run(model, [spec])
        assert st.new_ids == solo.new_ids
        if spec.prompt_logprobs:
            torch.testing.assert_close(torch.tensor(st.prompt_logprobs[1:]), torch.tensor(solo.prompt_logprobs[1:]),
                                       atol=1e-4, rtol=1e-4)
            assert [[i for i, _ in p] for p in st.prompt_top[1:]] == [[i for i, _ in p] for p in solo.prompt_top[1:]]


def test_prompt_logprobs_never_hold_full_logits(model, monkeypatch):
    """Prompt log-probabilities go through the output layer in chunks: no (B, S, V) logits at once."""
    import server.decode as decode

    vocab = model.config.vocab_size
    monkeypatch.setattr(decode, "LOGITS_CHUNK_ELEMS", 2 * 4 * vocab, raising=False)  # 4 positions of 2 rows
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.numel()))
    try:
        prompts = [list(range(5, 45)), list(range(60, 90))]
        batch = run(model, [RowSpec(p, 2, prompt_logprobs=True, top_logprobs=3) for p in prompts])
    finally:
        handle.remove()
    assert max(seen) <= 2 * 4 * vocab, f"the output layer produced {max(seen)} logits at once"
    for p, st in zip(prompts, batch):
        nll, _ = sequence_nll(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))
        assert -sum(st.prompt_logprobs[1:]) == pytest.approx(float(nll[0]), rel=1e-4)
        assert len(st.prompt_top) == len(p)
