"""TokenTracker: ids/padding/context aligned with router rows, across generate() steps.

Checked against a brute-force Python reference on small padded inputs."""

import torch

from var_moe.tiny import tiny_model
from var_moe.token_tracker import TokenTracker, contexts_with_history


def brute_contexts(history, ids, valid, w):
    out = []
    for b in range(ids.shape[0]):
        seen = [t for t in history[b].tolist() if t >= 0]
        row = []
        for j in range(ids.shape[1]):
            ctx = seen[-w:] if w else []
            row.append([-1] * (w - len(ctx)) + ctx)
            if valid[b, j]:
                seen.append(int(ids[b, j]))
        hist = seen[-w:] if w else []
        out.append((row, [-1] * (w - len(hist)) + hist))
    return out


def test_contexts_match_brute_force():
    """Chunks of 6 positions and single decode positions (a path of its own), with padding and
    partly filled histories, against the plain-Python reference."""
    g = torch.Generator().manual_seed(0)
    for w, s in ((0, 6), (1, 6), (3, 6), (1, 1), (3, 1)):  # s = 1: the decode-step path
        for _ in range(20):
            b = 3
            ids = torch.randint(0, 50, (b, s), generator=g)
            valid = torch.rand((b, s), generator=g) > 0.3
            hist = torch.randint(-1, 50, (b, w), generator=g)
            # history is right-aligned: -1 only on the left
            for r in range(b):
                k = int(torch.randint(0, w + 1, (1,), generator=g)) if w else 0
                hist[r, : w - k] = -1
                if k:
                    hist[r, w - k :] = hist[r, w - k :].clamp_min(0)
            ctx, new_hist = contexts_with_history(hist, ids, valid, w)
            ref = brute_contexts(hist, ids, valid, w)
            for r in range(b):
                assert ctx[r].tolist() == ref[r][0]
                assert new_hist[r].tolist() == ref[r][1]


def test_tracker_forward_and_generate_with_left_padding():
    model = tiny_model("mixtral")
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    seen = []
    with TokenTracker(model, window=2) as tr:
        model(input_ids=ids, attention_mask=mask)
        cur = tr.current
        assert cur.ids_T.tolist() == ids.reshape(-1).tolist()
        assert cur.valid_T.tolist() == mask.bool().reshape(-1).tolist()
        assert cur.context_TW[2].tolist() == [-1, -1]
        assert cur.context_TW[4].tolist() == [5, 6]
        assert cur.prev_T[9].tolist() == 11

        def spy(module, args):
            seen.append(tr.current.context_TW.clone())

        h = model.model.layers[0].mlp.gate.register_forward_pre_hook(spy)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        h.remove()
    gen = out[:, ids.shape[1]:]
    # step 2 (first decode step) sees one new token per row; its context is the prompt's last two
    assert seen[1].shape == (2, 2)
    assert seen[1][0].tolist() == [6, 7]
    assert seen[1][1].tolist() == [11, 12]
    assert seen[2][0].tolist() == [7, int(gen[0, 0])]
    assert tr.current is None


def test_one_row_cpu_steps_on_the_host_equal_brute_force():
    """Batch-1 decoding on CPU keeps the history as host ints (`_host_step`): ids, padding, context
    and prev of every forward equal the plain-Python reference, through a masked step, a 3-token
    chunk in the middle (back to tensors) and more single steps, for windows 0, 1 and 3."""
    model = tiny_model("mixtral")
    prompt = torch.tensor([[0, 5, 6, 7]])
    pmask = torch.tensor([[0, 1, 1, 1]])
    feeds = [([9], [1]), ([10], [0]), ([11], [1]), ([12, 13, 14], [1, 0, 1]), ([15], [1]), ([16], [1])]
    for w in (0, 1, 3):
        seen_valid = [5, 6, 7]
        with TokenTracker(model, window=w) as tr, torch.no_grad():
            out = model(input_ids=prompt, attention_mask=pmask, use_cache=True)
            mask = pmask
            for toks, valid in feeds:
                mask = torch.cat([mask, torch.tensor([valid])], 1)
                out = model(input_ids=torch.tensor([toks]), attention_mask=mask, past_key_values=out.past_key_values,
                            use_cache=True)
                cur = tr.current
                assert (cur.one is not None) == (len(toks) == 1)  # the host path ran for single steps
                ctx = []
                for t, v in zip(toks, valid):
                    c = seen_valid[-w:] if w else []
                    ctx.append([-1] * (w - len(c)) + c)
                    if v:
                        seen_valid.append(t)
                assert cur.ids_T.tolist() == toks and cur.valid_T.tolist() == [bool(v) for v in valid]
                assert cur.context_TW.tolist() == ctx and cur.rows == len(toks)
                assert cur.prev_T.tolist() == [c[-1] if w else -1 for c in ctx]
