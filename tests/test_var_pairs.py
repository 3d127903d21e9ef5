"""The (previous token, token) tier against a brute-force construction on hand-made evidence:
pair sets chosen on the choosing side, capped certifying counts, one Benjamini-Hochberg family
over token and pair candidates of all layers, and the rows each tier serves on test evidence.
Run: `pytest tests/test_var_pairs.py`."""

import math
import random
from collections import Counter, defaultdict

import pytest
import torch

from brute_stats import brute_force_bh, brute_force_candidates
from var_moe.errors import InvalidInputError
from var_moe.validation.served import score_served, served_agreement
from var_moe.var.config import VARConfig
from var_moe.var.evidence import LayerEvidence
from var_moe.var.pairs import pair_candidates, served_masks
from var_moe.var.served import find_pairs as pair_lookup
from var_moe.var.certify import layer_candidates
from var_moe.var.tables import VARTables, certify_entries

torch.set_num_threads(1)
E, K, V = 4, 2, 8
SETS = [(0, 1), (0, 2), (1, 2), (2, 3), (1, 3)]


def occurrences(seed: int, docs: range, layer: int) -> list[tuple[int, int, int, tuple[int, int]]]:
    """(doc, prev, token, sorted set): tokens 0-3 follow their token, 4-7 split by previous token
    (so only pairs reach a high agreement for them), with some noise; prev = -1 at a document start."""
    rnd = random.Random(seed * 100 + layer)
    out = []
    for d in docs:
        prev = -1
        for _ in range(rnd.randint(40, 100)):
            tok = rnd.randrange(V)
            if tok < 4:
                s = SETS[(tok + layer) % 5]
            else:
                s = SETS[(tok + max(prev, 0) + layer) % 5] if prev % 2 == 0 else SETS[(tok + 2 * layer) % 5]
            if rnd.random() < 0.06:
                s = SETS[rnd.randrange(5)]
            out.append((d, prev, tok, s))
            prev = tok
    return out


def evidence(occ: list) -> LayerEvidence:
    ev = LayerEvidence(V, E, K)
    doc, prev, tok, sets = (torch.tensor(x) for x in zip(*occ))
    n = len(occ)
    ev.add(doc, prev, tok, sets, torch.full((n, K), 0.5), torch.full((n, E), 0.25))
    ev.consolidate()
    return ev


def brute_pairs(occ: list, chooser_occ: list | None, cap: int | None, min_count: int, target: float,
                prescreen: bool) -> dict[tuple[int, int], dict]:
    """Per (prev, token): modal set on the choosing side (ties -> smallest), share, capped counts."""
    sel: dict[tuple, Counter] = defaultdict(Counter)
    cert: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for doc, prev, tok, s in (occ if chooser_occ is None else chooser_occ):
        if prev >= 0 and (chooser_occ is not None or doc % 2 == 0):
            sel[(prev, tok)][s] += 1
    for doc, prev, tok, s in occ:
        if prev >= 0 and (chooser_occ is not None or doc % 2 == 1):
            cert[(prev, tok)][doc].append(s)
    out = {}
    for key, counter in sel.items():
        n_sel = sum(counter.values())
        if n_sel < min_count:
            continue
        best = max(counter.values())
        modal = min(s for s, c in counter.items() if c == best)
        agree = total = 0.0
        for sets in cert[key].values():
            n, a = len(sets), sum(1 for s in sets if s == modal)
            w = n if cap is None else min(n, cap)
            agree, total = agree + a * w / n, total + w
        eligible = total > 0 and (not prescreen or best / n_sel >= target)
        out[key] = {"modal": modal, "agree": agree, "total": total, "eligible": eligible}
    return out


def pvalue(agree: float, total: float, target: float) -> float:
    z = (agree / total - target) / math.sqrt(target * (1 - target) / total)
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("separate,cap,prescreen", [(True, 3, True), (False, None, True), (True, 2, False)])
def test_pair_tier_equals_brute_force(separate, cap, prescreen):
    target, min_count = 0.75, 3
    cfg = VARConfig(frequency_threshold=min_count, entropy_threshold=None, target_agreement=target,
                    max_per_document=cap, multiplicity="bh")
    occ = {l: occurrences(1, range(60), l) for l in (0, 1)}
    ch_occ = {l: occurrences(2, range(100, 140), l) for l in (0, 1)} if separate else {0: None, 1: None}
    cal = {l: evidence(o) for l, o in occ.items()}
    ch = {l: (evidence(o) if o is not None else None) for l, o in ch_occ.items()}
    choose = "separate" if separate else "even"
    cands = {l: layer_candidates(cal[l], cfg, choose, ch[l]) for l in cal}
    pc = {l: pair_candidates(cal[l], cfg, None, prescreen, choose, ch[l]) for l in cal}
    tabs, ptabs, info = certify_entries(cands, pc, cfg)

    pvals, keys = [], []
    ref_pairs = {}
    for l in cal:
        tok_occ = [(d, p, t, s, 0.0) for d, p, t, s in occ[l]]
        ch_tok = None if ch_occ[l] is None else [(d, p, t, s, 0.0) for d, p, t, s in ch_occ[l]]
        for tok, r in brute_force_candidates(tok_occ, cap, min_count, None, ch_tok).items():
            if r["eligible"]:
                pvals.append(pvalue(r["agree"], r["total"], target))
                keys.append(("token", l, tok))
        ref_pairs[l] = brute_pairs(occ[l], ch_occ[l], cap, min_count, target, prescreen)
        # every candidate pair, accepted or not: same keys, sets and capped counts
        c = pc[l]
        got = {(int(k) // V, int(k) % V): i for i, k in enumerate(c.keys_P)}
        assert set(got) == set(ref_pairs[l])
        for key, r in ref_pairs[l].items():
            i = got[key]
            assert tuple(sorted(c.sets_PK[i].tolist())) == r["modal"]
            assert float(c.agree_P[i]) == pytest.approx(r["agree"]) and float(c.total_P[i]) == pytest.approx(r["total"])
            assert bool(c.eligible_P[i]) == r["eligible"]
            if r["eligible"]:
                pvals.append(pvalue(r["agree"], r["total"], target))
                keys.append(("pair", l, key))
    want = brute_force_bh(pvals, keys, 0.025)
    got_tok = {("token", l, t) for l, tab in tabs.items() for t in tab.member_V.nonzero().squeeze(1).tolist()}
    got_pair = {("pair", l, (int(k) // V, int(k) % V)) for l, p in ptabs.items() for k in p.keys_P}
    assert got_tok | got_pair == want
    assert any(k[0] == "pair" for k in want) and any(k[0] == "token" for k in want)  # both tiers take part
    assert info["pair_candidates"] + info["candidates"] == len(pvals)
    for l, p in ptabs.items():
        assert bool((p.bound_P >= target - 1e-9).all())
        assert torch.equal(p.keys_P, p.keys_P.sort().values)
        for k, s in zip(p.keys_P.tolist(), p.sets_PK.tolist()):
            assert tuple(sorted(s)) == ref_pairs[l][(k // V, k % V)]["modal"]

    # serving on test evidence: token tier first, pair tier only where the token has no entry
    test_occ = {l: occurrences(3, range(200, 212), l) for l in cal}
    test = {l: evidence(o) for l, o in test_occ.items()}
    masks = {}
    for l in cal:
        m = served_masks(test[l], tabs[l], ptabs[l])
        masks[l] = (test[l].rows_R4, test[l].counts_R, m["token_served"] | m["pair_served"],
                    m["token_agree"] | m["pair_agree"], tabs[l].size + ptabs[l].size)
        tok_set = {t: tuple(sorted(tabs[l].experts_VK[t].tolist())) for t in tabs[l].member_V.nonzero().squeeze(1).tolist()}
        pair_set = {(k // V, k % V): tuple(sorted(s)) for k, s in zip(ptabs[l].keys_P.tolist(), ptabs[l].sets_PK.tolist())}
        n = Counter()
        for _d, prev, tok, s in test_occ[l]:  # a loop over tokens is fine in a brute-force reference
            served = tok_set.get(tok) or pair_set.get((prev, tok))
            tier = "token" if tok in tok_set else ("pair" if (prev, tok) in pair_set else None)
            if tier:
                n[tier] += 1
                n[tier + "_agree"] += served == s
        w = test[l].counts_R
        for tier in ("token", "pair"):
            assert int((w * m[f"{tier}_served"]).sum()) == n[tier]
            assert int((w * m[f"{tier}_agree"]).sum()) == n[tier + "_agree"]
        assert n["pair"] > 0 or l != 0 or not ptabs[l].size
    sc = score_served(masks, target, resamples=50)
    total = sum(len(o) for o in test_occ.values())
    assert sc["overall"]["coverage"] == pytest.approx(sum(sc["layers"][str(l)]["served"] for l in cal) / total)


def test_no_pair_candidates_leave_the_token_tier_unchanged():
    cfg = VARConfig(frequency_threshold=3, entropy_threshold=None, target_agreement=0.75, max_per_document=3)
    occ = {l: occurrences(5, range(24), l) for l in (0, 1)}
    cal = {l: evidence(o) for l, o in occ.items()}
    cands = {l: layer_candidates(cal[l], cfg) for l in cal}
    base, _, info0 = certify_entries(cands, {}, cfg)
    tabs, ptabs, info = certify_entries(cands, {}, cfg)
    assert ptabs == {} and info == info0
    for l in cal:
        for name in ("member_V", "bound_V", "agree_V", "total_V"):
            assert torch.equal(getattr(tabs[l], name), getattr(base[l], name))
    # served_agreement (token tables) equals the masks' scoring with no pair entries
    test = {l: evidence(occurrences(6, range(300, 310), l)) for l in cal}
    t = VARTables(base, {"config": cfg.to_dict(), "layers": [0, 1]})

    class Ev:
        layers = test

    want = served_agreement(t, Ev(), resamples=50)
    masks = {}
    for l in cal:
        m = served_masks(test[l], base[l], None)
        assert not bool(m["pair_served"].any())
        masks[l] = (test[l].rows_R4, test[l].counts_R, m["token_served"], m["token_agree"], base[l].size)
    assert score_served(masks, cfg.target_agreement, resamples=50) == want


def test_pair_lookup_and_refusals():
    keys = torch.tensor([1 * V + 2, 3 * V + 0, 7 * V + 7])
    hit, idx = pair_lookup(keys, torch.tensor([1, 3, -1, 7, 0, 7]), torch.tensor([2, 0, 2, 7, 0, 6]), V)
    assert hit.tolist() == [True, True, False, True, False, False]
    assert idx[hit].tolist() == [0, 1, 2]
    hit, _ = pair_lookup(torch.zeros(0, dtype=torch.long), torch.tensor([1]), torch.tensor([2]), V)
    assert hit.tolist() == [False]
    ev = evidence(occurrences(1, range(4), 0))
    with pytest.raises(InvalidInputError, match="entropy"):
        pair_candidates(ev, VARConfig(entropy_threshold=0.9))
    with pytest.raises(InvalidInputError, match="min_pair_count"):
        pair_candidates(ev, VARConfig(entropy_threshold=None), min_pair_count=0)


def test_pair_flags_reach_the_config():
    import argparse

    from var_moe.commands._var import add_var_flags, config_from_args

    p = argparse.ArgumentParser()
    add_var_flags(p, with_tables=False)
    cfg = config_from_args(p.parse_args(["--pair-entries", "--min-pair-count", "7"]))
    assert cfg.pair_entries and cfg.min_pair_count == 7
    assert config_from_args(p.parse_args([])).pair_entries  # on in the presets
    assert all(config_from_args(p.parse_args(["--preset", n])).pair_entries for n in ("conservative", "aggressive"))
    assert not config_from_args(p.parse_args(["--no-pair-entries"])).pair_entries
    # an entropy cap has no per-pair counterpart: it turns the presets' pairs off unless asked for
    capped = config_from_args(p.parse_args(["--entropy-threshold", "0.85"]))
    assert capped.entropy_threshold == 0.85 and not capped.pair_entries
    with pytest.raises(InvalidInputError, match="min_pair_count"):
        config_from_args(p.parse_args(["--pair-entries", "--min-pair-count", "0"]))
    with pytest.raises(InvalidInputError, match="pair_entries"):
        config_from_args(p.parse_args(["--pair-entries", "--entropy-threshold", "0.85"]))
