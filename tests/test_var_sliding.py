"""Sliding-window perplexity (var_moe/var/eval_data.py): with stride == window it is the old
back-to-back piece scoring, row for row; per token it equals the model run on exactly the context
the windowing defines (brute force), every token after a document's first scored exactly once;
bad strides are CLI errors naming the flag. Run: `pytest tests/test_var_sliding.py`."""

import random

import pytest
import torch
from transformers import AutoTokenizer

from var_moe.cli import main
from var_moe.errors import InvalidInputError
from var_moe.tiny import tiny_model
from var_moe.var.eval_data import scoring_info, sliding_batches, window_batches, window_starts
from var_moe.perplexity import token_nll
from var_moe.var.evaluate import _per_doc, batch_nll, eval_batches

torch.set_num_threads(1)
CPU = torch.device("cpu")


def doc_sums(model, batches):
    rows = [batch_nll(model, b, CPU) for b in batches]
    return _per_doc(batches, [r[0] for r in rows], [r[1] for r in rows])


@pytest.mark.parametrize("per_doc", [1, None])
def test_stride_equal_to_window_is_the_piece_scoring(reference_model_dir, per_doc):
    tok = AutoTokenizer.from_pretrained(reference_model_dir)
    model = tiny_model("mixtral", seed=1, vocab_size=len(tok))
    old = eval_batches(tok, "stdlib", "test", None, 64, 8, max_per_doc=per_doc, max_docs=3)
    new = sliding_batches(tok, "stdlib", "test", 64, 64, 8, max_docs=3, max_windows_per_doc=per_doc)
    assert len(old) == len(new)
    for o, n in zip(old, new):
        assert torch.equal(o.ids, n.ids) and torch.equal(o.mask, n.mask) and o.doc_B == n.doc_B
    (o_nll, o_cnt), (n_nll, n_cnt) = doc_sums(model, old), doc_sums(model, new)
    assert (o_cnt == n_cnt).all() and o_cnt.sum() > 0
    assert o_nll.tolist() == n_nll.tolist()
    assert scoring_info(new, 64, 64)["method"] == "back-to-back pieces"


def context_start(p: int, window: int, stride: int) -> int:
    """Where token p's context begins, from the windowing's definition (windows start at multiples
    of the stride; a token is scored by the first window that reaches it)."""
    return 0 if p < window else ((p - window) // stride + 1) * stride


@pytest.mark.parametrize("window,stride", [(12, 5), (12, 1), (12, 11), (8, 8)])
def test_sliding_per_token_nll_equals_brute_force(window, stride):
    model = tiny_model("mixtral", seed=2)
    vocab = model.config.vocab_size
    rng = random.Random(window * 100 + stride)
    lengths = [1, 2, 7, 12, 13, 17, 31, 50]
    docs = [[rng.randrange(1, vocab) for _ in range(n)] for n in lengths]
    batches = window_batches(docs, window, stride, batch_size=5, pad_id=0)
    nll_doc = [torch.zeros(n, dtype=torch.float64) for n in lengths]
    count_doc = [torch.zeros(n, dtype=torch.long) for n in lengths]
    for b in batches:
        nll_BS, keep_BS = token_nll(model, b.ids, b.mask, b.score_from_B)
        for row, (d, start) in enumerate(zip(b.doc_B, b.start_B)):  # a test may loop over rows
            pos = torch.nonzero(keep_BS[row]).flatten() + 1  # target positions in the window
            nll_doc[d].index_add_(0, start + pos, nll_BS[row, pos - 1])
            count_doc[d].index_add_(0, start + pos, torch.ones_like(pos))
    with torch.no_grad():
        for d, ids in enumerate(docs):
            for p in range(len(ids)):
                if p == 0 or (stride == window and p % window == 0):
                    # no context: a document's first token, and with stride == window each piece's first
                    assert count_doc[d][p] == 0
                    continue
                assert count_doc[d][p] == 1, (d, p)
                s = context_start(p, window, stride)
                assert 1 <= p - s <= window - 1
                assert p < window or p - s >= window - stride  # at least window - stride tokens of context
                logits = model(input_ids=torch.tensor([ids[s:p]])).logits[0, -1].float()  # predicts ids[p]
                ref = -torch.log_softmax(logits, -1)[ids[p]].double()
                torch.testing.assert_close(nll_doc[d][p], ref, rtol=1e-4, atol=1e-5)
    expected = sum(n - 1 for n in lengths if n >= 2) - (sum((n - 1) // window for n in lengths) if stride == window else 0)
    assert int(sum(c.sum() for c in count_doc)) == expected
    nll, cnt = doc_sums(model, batches)  # the per-document sums the bootstrap uses agree
    assert cnt.tolist() == [int(c.sum()) for c in count_doc if c.sum() > 0]
    torch.testing.assert_close(torch.tensor(nll), torch.stack([v.sum() for v, c in zip(nll_doc, count_doc) if c.sum() > 0]))


def test_window_starts_and_limits():
    assert window_starts(1, 8, 4) == [] and window_starts(8, 8, 4) == [(0, 1)]
    assert window_starts(13, 8, 4) == [(0, 1), (4, 4), (8, 4)]
    docs = [list(range(1, 40)), list(range(1, 30))]
    assert sum(len(b.doc_B) for b in window_batches(docs, 8, 4, 3, 0, max_windows_per_doc=2)) == 4
    assert sum(len(b.doc_B) for b in window_batches(docs, 8, 4, 3, 0, num_windows=5)) == 5
    for stride in (0, -3, 9):
        with pytest.raises(InvalidInputError, match="--stride"):
            window_batches(docs, 8, stride, 3, 0)


@pytest.mark.parametrize("flags,needle", [(["--stride", "0"], "--stride"), (["--stride", "300"], "--stride"),
                                          (["--scoring", "pieces", "--stride", "64"], "--stride"),
                                          (["--timing-batches", "0"], "--timing-batches")])
def test_evaluate_cli_names_the_bad_flag(tmp_path, capsys, flags, needle):
    code = main(["evaluate", "--mode", "baseline", "--max-length", "256", *flags, "--output", str(tmp_path / "o.json")])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_sweep_cli_names_a_bad_ppl_stride(tmp_path, capsys, reference_model_dir):
    stats = str(reference_model_dir / "var" / "routing_stats_calibration.parquet")
    code = main(["sweep", "--routing-stats", stats, "--evidence", str(tmp_path / "e.safetensors"), "--test-evidence",
                 str(tmp_path / "t.safetensors"), "--output", str(tmp_path / "s.json"), "--ppl-stride", "0"])
    assert code == 2
    assert "--ppl-stride" in capsys.readouterr().err and not (tmp_path / "e.safetensors").exists()
