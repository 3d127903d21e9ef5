"""Choosing and certifying table entries: the statistics behind `tables.py`.

Per layer (from `evidence.LayerEvidence`): each token's set is its most frequent exact top-k set on
the choosing documents (`_summary`), among tokens that pass the frequency / entropy filters there
(`passes_filters`); its agreement is counted on the certifying documents, each document counting at
most `max_per_document` occurrences since occurrences inside one document are correlated
(`capped_counts`). Which documents do which is the `choose` mode (`CHOOSE_MODES`):
  "even":     one evidence object; even documents choose, odd ones certify (the default);
  "separate": every document of a second evidence object (`chooser`, e.g. the training split)
              chooses, every document of the certifying one (the calibration split) certifies;
  "all":      every document chooses, nothing is certified (Phase 1's unverified predictors).
A one-sided score test per candidate (`score_pvalues`) and a multiplicity rule over all candidates
(`multiplicity_levels`: bh / holm / none) decide which entries are served; `wilson_lower_bound`
states each entry's bound. Also the validation-only (previous, token) and global modal sets, and
the shadow demotion rule. Config-independent parts are cached on the evidence object.
Test: `pytest tests/test_var_verification.py tests/test_var_tables.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..capture.router_math import decode_set_ids as decode_sets
from ..errors import InvalidInputError
from .config import MULTIPLICITY, VARConfig
from .evidence import LayerEvidence, half_of
from .served import pair_key


def wilson_lower_bound(successes: torch.Tensor, trials: torch.Tensor, z: float) -> torch.Tensor:
    """Lower end of the Wilson score interval for a binomial proportion (0 where trials == 0)."""
    n = trials.double().clamp_min(1)
    p = successes.double() / n
    z2 = z * z
    spread = z * torch.sqrt(p * (1 - p) / n + z2 / (4 * n**2))
    lower = (p + z2 / (2 * n) - spread) / (1 + z2 / n)
    return torch.where(trials > 0, lower.clamp(0, 1), torch.zeros_like(lower))


def demote_mask(running_bound: torch.Tensor, shadow_agree: torch.Tensor, shadow_total: torch.Tensor,
                target: float, z: float, min_checks: int) -> torch.Tensor:
    """Which table entries to take out, from calibration counts plus shadow checks in service.

    Two tests, either one demotes:
      - the running bound (`running_bound`: Wilson lower bound of calibration + shadow agreement,
        as the router keeps it) < target: the admission rule, re-checked with the new evidence;
      - served agreement alone: with at least `min_checks` shadow checks (0 = off), the Wilson
        upper bound of the shadow agreement < target, i.e. the entry is below target on the traffic
        actually served, at the same confidence, however large its calibration counts. Without it
        an entry admitted on thousands of calibration tokens needs thousands of disagreeing
        checks before the running bound drops.
    """
    combined = running_bound < target
    if min_checks <= 0:
        return combined
    # the Wilson interval is symmetric under p -> 1 - p: its upper end is one minus the failures' lower end
    upper = 1 - wilson_lower_bound(shadow_total - shadow_agree, shadow_total, z)
    return combined | ((shadow_total >= min_checks) & (upper < target))


def _modal(keys_RC: torch.Tensor, counts_R: torch.Tensor, num_key_cols: int) -> tuple[torch.Tensor, ...]:
    """Per distinct key (first `num_key_cols` columns of `keys_RC`), the row of its most frequent
    last column (ties -> the smallest, i.e. the first in sorted order) and the key's total count.
    Returns (keys_GC, modal_row_G, total_G, modal_count_G); rows are made unique and sorted here."""
    u, inv = torch.unique(keys_RC, dim=0, return_inverse=True)
    c = torch.zeros(u.shape[0], dtype=counts_R.dtype).index_add_(0, inv, counts_R)
    keys_G, group_R = torch.unique(u[:, :num_key_cols], dim=0, return_inverse=True)
    g = keys_G.shape[0]
    max_G = torch.zeros(g, dtype=c.dtype).scatter_reduce(0, group_R, c, "amax", include_self=False)
    total_G = torch.zeros(g, dtype=c.dtype).index_add_(0, group_R, c)
    row_R = torch.arange(u.shape[0])
    cand_R = torch.where(c == max_G[group_R], row_R, torch.full_like(row_R, u.shape[0]))
    first_G = torch.full((g,), u.shape[0], dtype=torch.long).scatter_reduce(0, group_R, cand_R, "amin")
    return keys_G, u[first_G, num_key_cols], total_G, max_G


def document_groups(rows_R4: torch.Tensor, key_R: torch.Tensor, code_X: torch.Tensor,
                    counts_R: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per distinct (document, key) of certifying rows: occurrences n_D, agreements a_D (rows whose
    set code equals the key's chosen one, `code_X[key]`) and key_D. The key is a token for token
    entries and a (previous, token) pair index for pair entries (`pairs.py`)."""
    counts_R = counts_R.double()
    agree_R = rows_R4[:, 3] == code_X[key_R]
    dk, inv = torch.unique(torch.stack([rows_R4[:, 0], key_R], 1), dim=0, return_inverse=True)
    n_D = torch.zeros(dk.shape[0], dtype=torch.float64).index_add_(0, inv, counts_R)
    a_D = torch.zeros(dk.shape[0], dtype=torch.float64).index_add_(0, inv, agree_R.double() * counts_R)
    return n_D, a_D, dk[:, 1]


def capped_counts(n_D: torch.Tensor, a_D: torch.Tensor, key_D: torch.Tensor, num_keys: int,
                  max_per_document: int | None) -> tuple[torch.Tensor, ...]:
    """Per key, capped certifying counts from per-(document, key) groups: a group with n occurrences,
    a agreeing, counts w = min(n, cap) trials and a * w / n agreements (cap None: w = n).
    Returns float64 (agree, total, documents), each of length `num_keys`."""
    w_D = n_D if max_per_document is None else n_D.clamp_max(max_per_document)
    a_D = a_D * w_D / n_D.clamp_min(1)
    agree = torch.zeros(num_keys, dtype=torch.float64).index_add_(0, key_D, a_D)
    total = torch.zeros(num_keys, dtype=torch.float64).index_add_(0, key_D, w_D)
    docs = torch.zeros(num_keys, dtype=torch.float64).index_add_(0, key_D, torch.ones_like(w_D))
    return agree, total, docs


CHOOSE_MODES = ("even", "separate", "all")


def side_rows(ev: LayerEvidence, choose: str, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_R4, counts_R) of `ev` that choose sets (`side` 0) or certify them (1): the even or odd
    documents, or every row where the evidence is used whole (the chooser's in "separate" and all
    of it in "all" choose; the certifying evidence's in "separate" certify)."""
    if choose == "separate" or (choose == "all" and side == 0):
        return ev.rows_R4, ev.counts_R
    keep = half_of(ev.rows_R4[:, 0]) == side
    return ev.rows_R4[keep], ev.counts_R[keep]


def choosing_halves(choose: str) -> slice:
    """The parity halves whose per-token sums choose: the even one, or both (a chooser's, or "all")."""
    return slice(0, 1) if choose == "even" else slice(0, 2)


def choosing_side(ev: LayerEvidence, choose: str, chooser: LayerEvidence | None) -> LayerEvidence:
    """The evidence sets are chosen from (checked against the certifying evidence's shape)."""
    if choose not in CHOOSE_MODES:
        raise InvalidInputError(f"choose must be one of {CHOOSE_MODES}, got {choose!r}")
    if (choose == "separate") != (chooser is not None):
        raise InvalidInputError('choose="separate" needs a chooser evidence object, and only it takes one')
    if chooser is None:
        return ev
    if (chooser.vocab, chooser.num_experts, chooser.top_k) != (ev.vocab, ev.num_experts, ev.top_k):
        raise InvalidInputError(f"choosing evidence has (vocab, E, k) = {(chooser.vocab, chooser.num_experts, chooser.top_k)}, "
                                f"certifying evidence {(ev.vocab, ev.num_experts, ev.top_k)}")
    return chooser


def _summary(ev: LayerEvidence, choose: str = "even", chooser: LayerEvidence | None = None) -> dict[str, torch.Tensor]:
    """Config-independent parts of one layer's evidence: chosen sets and certifying groups (cached
    on the certifying evidence; with a chooser, per chooser row tensor, which consolidating replaces)."""
    src = choosing_side(ev, choose, chooser)
    cache = getattr(ev, "_summary_cache", None) or {}
    key = (choose, id(src.rows_R4))
    if key in cache and cache[key]["chooser_rows"] is src.rows_R4:  # an id can be reused after consolidating
        return cache[key]
    rows, counts = side_rows(src, choose, 0)
    keys, code_G, _, _ = _modal(rows[:, 2:4], counts, 1)
    modal_code_V = torch.full((ev.vocab,), -1, dtype=torch.long)
    modal_code_V[keys[:, 0]] = code_G
    c_R4, c_R = side_rows(ev, choose, 1)
    n_D, a_D, tok_D = document_groups(c_R4, c_R4[:, 2], modal_code_V, c_R)
    out = {"modal_code_V": modal_code_V, "n_D": n_D, "a_D": a_D, "tok_D": tok_D, "chooser_rows": src.rows_R4}
    ev._summary_cache = {**cache, key: out}
    return out


def score_pvalues(agree: torch.Tensor, total: torch.Tensor, target: float) -> torch.Tensor:
    """One-sided p-value of H0 "agreement <= target" by the score (Wilson) test; 1 where total == 0.
    Wilson's lower bound at level z is >= target exactly when this p-value is <= 1 - Phi(z)."""
    n = total.clamp_min(1e-12)
    p = agree / n
    se = math.sqrt(max(target * (1 - target), 1e-12)) / n.sqrt()
    z = (p - target) / se
    pval = 0.5 * torch.special.erfc(z / math.sqrt(2))
    return torch.where(total > 0, pval, torch.ones_like(pval))


def multiplicity_levels(pvals_M: torch.Tensor, alpha: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted_M, level_M) over the family of M candidate entries.

    holm: family-wise error (any wrong entry) <= alpha, Holm's step-down;
    bh:   expected share of wrong entries among those accepted <= alpha (Benjamini-Hochberg; valid
          for independent or positively dependent tests);
    none: every entry tested at alpha on its own.
    `level_M` is the per-entry one-sided level the entry was (or would have been) tested at."""
    m = pvals_M.numel()
    if m == 0:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    order = torch.argsort(pvals_M, stable=True)
    ranked = pvals_M[order]
    i = torch.arange(1, m + 1, dtype=torch.float64)
    if method == "none":
        level = torch.full((m,), alpha, dtype=torch.float64)
        return pvals_M <= alpha, level
    if method == "holm":
        thr = alpha / (m - i + 1)
        fails = (ranked > thr).nonzero()
        stop = int(fails[0]) if fails.numel() else m  # accept ranks before the first failure
        acc_sorted = torch.arange(m) < stop
        level_sorted = thr
    elif method == "bh":
        ok = (ranked <= alpha * i / m).nonzero()
        r = int(ok[-1]) + 1 if ok.numel() else 0
        acc_sorted = torch.arange(m) < r
        level_sorted = torch.full((m,), alpha * max(r, 1) / m, dtype=torch.float64)
    else:
        raise InvalidInputError(f"multiplicity must be one of {MULTIPLICITY}, got {method!r}")
    accepted = torch.zeros(m, dtype=torch.bool)
    accepted[order] = acc_sorted
    level = torch.zeros(m, dtype=torch.float64)
    level[order] = level_sorted
    return accepted, level


@dataclass
class Candidates:
    """One layer's chosen sets and evidence before the multiplicity step."""

    modal_VK: torch.Tensor
    eligible_V: torch.Tensor  # passes frequency / entropy filters (choosing half only)
    agree_V: torch.Tensor
    total_V: torch.Tensor
    docs_V: torch.Tensor
    weights_VK: torch.Tensor
    mass_V: torch.Tensor
    pvalue_V: torch.Tensor
    select_V: torch.Tensor


def passes_filters(seen_V: torch.Tensor, freq_V: torch.Tensor, ent_V: torch.Tensor, config: VARConfig,
                   num_experts: int) -> torch.Tensor:
    """Tokens that may become entries: seen, at least `frequency_threshold` occurrences, mean
    entropy (nats) under the cap if there is one."""
    ok_V = seen_V & (freq_V >= config.frequency_threshold)
    if config.entropy_threshold is not None:
        ok_V &= ent_V <= config.entropy_limit_nats(num_experts)
    return ok_V


def layer_candidates(ev: LayerEvidence, config: VARConfig, choose: str = "even",
                     chooser: LayerEvidence | None = None) -> Candidates:
    """Choose each token's set on the choosing side; count its agreement on the certifying side.
    Filters (frequency, entropy) and served weights come from the choosing side only.
    With choose="all" nothing is held out, so no entry is eligible (Phase 1 predictors only)."""
    v, e, k = ev.vocab, ev.num_experts, ev.top_k
    src = choosing_side(ev, choose, chooser)
    sm = _summary(ev, choose, chooser)
    seen_V = sm["modal_code_V"] >= 0
    modal_VK = torch.zeros(v, k, dtype=torch.long)
    modal_VK[seen_V] = decode_sets(sm["modal_code_V"][seen_V], e, k)
    halves = choosing_halves(choose)
    freq_V = src.freq_2V[halves].sum(0)
    ent_V = src.ent_2V[halves].sum(0) / freq_V.clamp_min(1)
    eligible = passes_filters(seen_V, freq_V, ent_V, config, e)
    if choose == "all":  # nothing held out: nothing can be certified
        eligible = torch.zeros_like(eligible)
    agree_V, total_V, docs_V = capped_counts(sm["n_D"], sm["a_D"], sm["tok_D"], v, config.max_per_document)
    modal_VK, w_VK, mass_V = served_weights(src.mean_weights(torch.arange(v), modal_VK, halves), modal_VK, seen_V)
    pvals = score_pvalues(agree_V, total_V, config.target_agreement)
    return Candidates(modal_VK, eligible & (total_V > 0), agree_V, total_V, docs_V, w_VK, mass_V, pvals, freq_V)


def served_weights(w_XK: torch.Tensor, sets_XK: torch.Tensor, seen_X: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(sets_XK, weights_XK, mass_X) as served from `w_XK`, the mean learned weights of each set's
    experts (`LayerEvidence.mean_weights`): renormalised over the set (uniform where unseen), mass = their raw sum,
    and each set reordered so slot 0 is the expert with the largest stored weight (adaptive k keeps
    that one)."""
    k = sets_XK.shape[1]
    mass_X = w_XK.sum(1)
    w_XK = torch.where(seen_X[:, None], w_XK / mass_X.clamp_min(1e-12)[:, None], torch.full_like(w_XK, 1.0 / k))
    mass_X = torch.where(seen_X, mass_X, torch.ones_like(mass_X))
    w_XK, order = w_XK.sort(dim=1, descending=True)
    return sets_XK.gather(1, order), w_XK, mass_X


def pair_modes(ev: LayerEvidence, choose: str = "even", chooser: LayerEvidence | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (previous, token) pair on the choosing side: (keys_P = prev * V + token ascending,
    code_P of its modal set (ties -> smallest), its occurrences, the modal set's occurrences).
    Computed once per evidence object and choosing side (kept with the layer's summary): the
    validation pairs (`pair_table`) and the served pair tier (`pairs.pair_candidates`) read it."""
    sm = _summary(ev, choose, chooser)
    if "pairs" not in sm:
        rows, counts = side_rows(choosing_side(ev, choose, chooser), choose, 0)
        sel = rows[:, 1] >= 0  # a sequence start has no previous token
        if not bool(sel.any()):
            none = torch.zeros(0, dtype=torch.long)
            sm["pairs"] = none, none, counts.new_zeros(0), counts.new_zeros(0)
        else:
            keys, code_G, total_G, modal_G = _modal(rows[sel][:, 1:4], counts[sel], 2)
            sm["pairs"] = pair_key(0, keys[:, 0], keys[:, 1], ev.vocab), code_G, total_G, modal_G
    return sm["pairs"]


def pair_table(ev: LayerEvidence, min_pair_count: int, choose: str = "even",
               chooser: LayerEvidence | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys_P = prev * V + token sorted, sets_PK sorted, counts_P): modal set of each (previous,
    token) pair seen >= min_pair_count times on the choosing side."""
    keys, code, counts, _ = pair_modes(ev, choose, chooser)
    keep = counts >= min_pair_count
    return keys[keep], decode_sets(code[keep], ev.num_experts, ev.top_k), counts[keep]


def global_set(ev: LayerEvidence, choose: str = "even", chooser: LayerEvidence | None = None) -> torch.Tensor:
    """The single most frequent set on the choosing side (ties -> smallest)."""
    rows, counts = side_rows(choosing_side(ev, choose, chooser), choose, 0)
    codes, inv = torch.unique(rows[:, 3], return_inverse=True)
    c = torch.zeros(codes.numel(), dtype=torch.long).index_add_(0, inv, counts)
    return decode_sets(codes[int(torch.argmax(c))].reshape(1), ev.num_experts, ev.top_k)[0]
