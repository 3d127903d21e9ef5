"""One-row CPU steps (batch-1 decoding) decided on the host as they start (var/one_row.py): the
all-learned ones and the served ones give the same logits, counters and per-row counts as the
general path, step by step, for token entries, pair entries, padding, adaptive k, shadow checks and
counting off; a (previous, token) pair entry, and a demotion, are seen by the host mirrors.
Run: `pytest tests/test_var_decode_step.py`."""

import pytest
import torch

from var_moe.adapters import get_adapter
from var_moe.tiny import tiny_model
from var_moe.var.config import VARConfig
from var_moe.var.evidence import set_codes
from var_moe.var.pairs import PairTable
from var_moe.var.tables import VARTables
from var_moe.var.wrapper import VARModelWrapper

torch.set_num_threads(1)
E, K = 4, 2
PREV, PAIR_END = 20, 26  # 26 has no token entry in either layer; (20, 26) is a pair entry


def tables_for(model):
    """Layer 0 serves odd tokens, layer 1 tokens = 1 mod 3 (so t = 0, 2 mod 6 has no entry), plus
    one pair entry (PREV, PAIR_END) in layer 1."""
    tables = VARTables.empty(model, get_adapter(model), [0, 1])
    v = model.config.vocab_size
    tok = torch.arange(v)
    for l, member in ((0, tok % 2 == 1), (1, tok % 3 == 1)):
        t = tables[l]
        t.experts_VK[:] = torch.tensor([[0, 1], [2, 3], [1, 3]])[(tok + l) % 3]  # differ per layer
        t.weights_VK[:] = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])[(tok + 2 * l) % 3]
        t.member_V[:] = member
        t.bound_V[:], t.agree_V[:], t.total_V[:] = 0.99, 1000.0, 1000.0
    sets = torch.tensor([[2, 3]])
    tables.pair_tier = {1: PairTable(torch.tensor([PREV * v + PAIR_END]), sets, torch.tensor([[0.7, 0.3]]),
                                     torch.ones(1), set_codes(sets, E), torch.full((1,), 0.95),
                                     torch.full((1,), 100.0, dtype=torch.float64),
                                     torch.full((1,), 100.0, dtype=torch.float64))}
    return tables


# closed tokens (0, 2 mod 6: 12, 14, 30, 32, 38, 98), open ones, the pair (PREV, PAIR_END), a repeat,
# and PAIR_END after another token (no pair entry: closed)
STEPS = [12, 5, 14, PREV, PAIR_END, 30, 7, 32, 32, 38, 4, 98, 5, PAIR_END]
PAD_STEP = 7  # the new token of this step is masked out (valid False)


def closed_steps():
    """Per step: no token entry in any layer and the (previous valid token, token) not the pair."""
    out, prev = [], 11  # the prompt's last token
    for i, t in enumerate(STEPS):
        out.append(t % 6 in (0, 2) and not (prev == PREV and t == PAIR_END))
        if i != PAD_STEP:
            prev = t
    return out


def run(config, skip: bool):
    model = tiny_model("mixtral", seed=0)
    w = VARModelWrapper(model, config, tables=tables_for(model))
    if not skip:
        w.stack.host = None  # the general path at every step
    taken = []  # per decode step: the stack resolved it as all learned when it started
    hosted = []  # per decode step: decided on the host as it started (all learned or served)
    ids = torch.tensor([[3, 9, 16, 11]])
    mask = torch.ones_like(ids)
    logits = []
    with torch.no_grad():
        out = w(input_ids=ids, attention_mask=mask, use_cache=True)
        logits.append(out.logits)
        for i, t in enumerate(STEPS):
            mask = torch.cat([mask, torch.tensor([[0 if i == PAD_STEP else 1]])], 1)
            out = w(input_ids=torch.tensor([[t]]), attention_mask=mask, past_key_values=out.past_key_values,
                    use_cache=True)
            logits.append(out.logits)
            taken.append(w.stack.skip_step)
            hosted.append(w.stack.step_rows is not None)
            if i == 2:
                w.reset_stats()  # the row keeps what it counted
    result = (logits, w.stack.counts(), w.tier_counts(), w.row_tier_counts(), taken, hosted)
    w.restore()
    return result


CONFIGS = {"default": VARConfig(), "no_tracking": VARConfig(track_performance=False),
           "adaptive_k": VARConfig(adaptive_k=True, adaptive_k_min_weight=0.8),
           "shadow": VARConfig(shadow_rate=1.0, shadow_min_checks=1)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_skipped_steps_equal_the_general_path(name):
    config = CONFIGS[name]
    got, ref = run(config, skip=True), run(config, skip=False)
    assert all(torch.equal(a, b) for a, b in zip(got[0], ref[0]))
    assert torch.equal(got[1], ref[1])
    assert got[2] == ref[2]
    assert torch.equal(got[3], ref[3])
    assert not any(ref[4])
    # the empty step ran for the closed tokens only: never for an open one or the pair's end
    closed = closed_steps()
    assert closed[4] is False and closed[-1] is True  # the pair's end: open after PREV only
    if name != "shadow":  # shadow checks may demote entries and close more tokens
        assert got[4] == closed
    assert sum(got[4]) >= sum(closed)
    # open steps are served on the host too, except where the config needs the general path
    assert all(got[5]) == (name != "adaptive_k") and not any(ref[5])


def test_fast_pair_and_valid_counts_of_one_row_steps_equal_a_brute_force_count():
    """Per layer: fast rows = valid tokens with an entry (or the pair), learned = the other valid ones."""
    _, counts, tiers, rows, _, _ = run(VARConfig(), skip=True)
    fed = [3, 9, 16, 11] + STEPS
    valid = [True] * 4 + [i != PAD_STEP for i in range(len(STEPS))]
    prev = [None] + fed[:-1]
    # the pair's previous token is the previous VALID token; PAD_STEP's token is not before it here
    fast = {0: 0, 1: 0}
    n_valid = 0
    for i, (t, ok) in enumerate(zip(fed, valid)):
        if i < 4 + 3:  # before reset_stats(): the stack's counters restart there
            continue
        if not ok:
            continue
        n_valid += 1
        fast[0] += t % 2 == 1
        fast[1] += t % 3 == 1 or (prev[i] == PREV and t == PAIR_END)
    assert {l: tiers[(l, "fast")] for l in (0, 1)} == fast
    assert {l: tiers[(l, "learned")] for l in (0, 1)} == {l: n_valid - fast[l] for l in (0, 1)}


def test_a_demotion_closes_a_token_for_the_empty_step():
    model = tiny_model("mixtral", seed=0)
    w = VARModelWrapper(model, VARConfig(shadow_rate=0.5), tables=tables_for(model))
    stack = w.stack
    tok = 7  # 7 % 2 == 1: layer 0 only; 7 % 3 == 1: layer 1 too
    assert stack.host.open_V[tok]
    stack.pending_LV[stack.slot[0], tok] = True
    stack.apply_demotions()
    assert stack.host.open_V[tok]  # still served in layer 1
    stack.pending_LV[stack.slot[1], tok] = True
    stack.apply_demotions()
    assert not stack.host.open_V[tok]
    w.restore()


def test_steps_with_var_off_are_not_counted_and_not_resolved():
    """While VAR is off the stack resolves nothing as a forward starts (its counters count routed
    tokens only); switched back on, a closed token's step is counted again."""
    model = tiny_model("mixtral", seed=0)
    w = VARModelWrapper(model, VARConfig(), tables=tables_for(model))
    ids = torch.tensor([[3, 9, 16, 11]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = w(input_ids=ids, attention_mask=mask, use_cache=True)
        before = w.tier_counts()
        w.disable_var()
        for t in (12, 14):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            out = w(input_ids=torch.tensor([[t]]), attention_mask=mask, past_key_values=out.past_key_values,
                    use_cache=True)
            assert not w.stack.skip_step
        assert w.tier_counts() == before
        w.enable_var()
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        w(input_ids=torch.tensor([[30]]), attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert w.stack.skip_step
    assert {l: w.tier_counts()[(l, "learned")] - before[(l, "learned")] for l in (0, 1)} == {0: 1, 1: 1}
    w.restore()
