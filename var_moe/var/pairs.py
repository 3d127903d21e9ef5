"""The (previous token, token) tier: pair entries for rows whose token has no table entry.

A token whose occurrences split between expert sets cannot reach the target with any single set,
but its occurrences after one particular previous token often can. Per layer, `pair_candidates`
chooses each pair's modal exact top-k set on the choosing side (ties -> smallest set), kept if the
pair occurs >= `min_pair_count` times there and, optionally (`prescreen`), if that set's share of
those occurrences already reaches the target; nothing here looks at the certifying documents. They
certify it as they do token entries (`certify.py`: per-document cap, score test), in ONE
multiplicity family with the token candidates (`tables.certify_entries`). Served keys are
`prev * V + token` sorted per layer (`served.pair_key` with slot 0); every engine stacks them into
`served.ServedTables` and decides rows with `served.decide` (a pair entry serves a row only where the
token tier has none); `served_masks` is that decision on evidence. Rows at a sequence start
(previous = -1) never hit. The entropy cap has no per-pair counterpart (evidence keeps entropy per
token), so configs with one are refused here.
Shapes: P pair entries, K top-k, V vocabulary, R evidence rows, T tokens.
Test: `pytest tests/test_var_pairs.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture.router_math import decode_set_ids as decode_sets, set_codes
from ..errors import InvalidInputError
from .certify import (capped_counts, choosing_halves, choosing_side, document_groups, pair_modes, score_pvalues,
                      served_weights, side_rows)
from .config import VARConfig
from .evidence import LayerEvidence
from .served import ServedTables, decide, find_pairs, split_key


@dataclass
class PairCandidates:
    """One layer's candidate pair entries before the multiplicity step (sorted by key)."""

    keys_P: torch.Tensor  # long, prev * V + token, ascending
    code_P: torch.Tensor  # long, set code of the chosen set (`evidence.set_codes`)
    sets_PK: torch.Tensor  # long, the chosen set, the expert with the largest stored weight first
    weights_PK: torch.Tensor  # float64, the token's mean learned weights of those experts, renormalised
    mass_P: torch.Tensor  # float64, their raw sum
    eligible_P: torch.Tensor  # bool, enters the family (count, pre-screen, certifying occurrences > 0)
    agree_P: torch.Tensor  # float64, capped certifying agreements
    total_P: torch.Tensor  # float64, capped certifying trials
    pvalue_P: torch.Tensor  # float64, one-sided score test of "agreement <= target"


@dataclass
class PairTable:
    """One layer's certified pair entries (only the accepted ones, sorted by key)."""

    keys_P: torch.Tensor  # long, prev * V + token, ascending
    sets_PK: torch.Tensor  # long, the chosen set, the expert with the largest stored weight first
    weights_PK: torch.Tensor  # float32, rows sum to 1 over the set
    mass_P: torch.Tensor  # float32, raw sum of the mean learned weights over the set
    code_P: torch.Tensor  # long, the set's code (`evidence.set_codes` of the sorted set)
    bound_P: torch.Tensor  # float32, Wilson lower bound at the entry's adjusted level
    agree_P: torch.Tensor  # float64
    total_P: torch.Tensor  # float64

    @property
    def size(self) -> int:
        return int(self.keys_P.numel())

    def served_bytes(self) -> int:
        """Bytes served as sorted int64 keys + int64 sets + float32 weights per expert."""
        k = self.sets_PK.shape[1] if self.sets_PK.dim() == 2 else 0
        return self.size * (8 + 12 * k)


def pair_candidates(ev: LayerEvidence, config: VARConfig, min_pair_count: int | None = None, prescreen: bool = True,
                    choose: str = "even", chooser: LayerEvidence | None = None) -> PairCandidates:
    """Choose each (previous, token) pair's set on the choosing side, count its agreement on the
    certifying side with the token entries' per-document cap, and its score-test p-value.
    `min_pair_count` None: the config's `frequency_threshold`, the token entries' rule."""
    if config.entropy_threshold is not None:
        raise InvalidInputError("the (previous, token) tier has no per-pair entropy; use entropy_threshold=None")
    min_count = config.frequency_threshold if min_pair_count is None else min_pair_count
    if min_count < 1:
        raise InvalidInputError(f"min_pair_count must be >= 1, got {min_count}")
    v = ev.vocab
    src = choosing_side(ev, choose, chooser)
    keys_P, code_P, select_P, modal_P = pair_modes(ev, choose, chooser)  # keys ascend
    keep = select_P >= min_count
    keys_P, code_P = keys_P[keep], code_P[keep]
    rows, counts = side_rows(ev, choose, 1)
    hit_R, idx_R = find_pairs(keys_P, rows[:, 1], rows[:, 2], v)
    n_D, a_D, key_D = document_groups(rows[hit_R], idx_R[hit_R], code_P, counts[hit_R])
    agree_P, total_P, _ = capped_counts(n_D, a_D, key_D, keys_P.numel(), config.max_per_document)
    eligible_P = total_P > 0
    if prescreen:  # choosing side only: the modal set's share of the pair's occurrences must reach the target there
        eligible_P &= modal_P[keep].double() / select_P[keep].double().clamp_min(1) >= config.target_agreement
    pvalue_P = score_pvalues(agree_P, total_P, config.target_agreement)
    # served weights: pairs keep no weights of their own, so the token's mean learned weight of each
    # expert of the pair's set (on the choosing side), renormalised over the set
    tok_P = split_key(keys_P, v)[2]
    sets_PK = decode_sets(code_P, ev.num_experts, ev.top_k)
    sets_PK, weights_PK, mass_P = served_weights(src.mean_weights(tok_P, sets_PK, choosing_halves(choose)), sets_PK,
                                                 torch.ones_like(tok_P, dtype=torch.bool))
    return PairCandidates(keys_P, code_P, sets_PK, weights_PK, mass_P, eligible_P, agree_P, total_P, pvalue_P)


def served_masks(ev: LayerEvidence, table: object, pairs: PairTable | None) -> dict[str, torch.Tensor]:
    """Per row of (test) evidence: which rows the token tier serves and which the pair tier serves
    (`served.decide`, the routers' decision), and whether the served set equals the row's exact set.
    `table` is a `tables.LayerTable` (token tier)."""
    rows = ev.rows_R4
    served = ServedTables.build({0: table}, {0: pairs} if pairs is not None else {}, [0], {}, ev.vocab, ev.top_k)
    d = decide(served, rows[:, 2], torch.ones(rows.shape[0], dtype=torch.bool), rows[:, 1])
    same_R = rows[:, 3] == set_codes(d.idx_LTK[0].long().sort(1).values, ev.num_experts)
    tok_R = d.token_LT[0]
    pair_R = d.pair_LT[0] if d.pair_LT is not None else torch.zeros_like(tok_R)
    return {"token_served": tok_R, "token_agree": tok_R & same_R, "pair_served": pair_R, "pair_agree": pair_R & same_R}
