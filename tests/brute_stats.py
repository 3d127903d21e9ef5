"""Test helpers: brute-force routing statistics and table evidence, obviously correct and slow.

`brute_force_stats`: per-(layer, token) statistics with the Phase 1 column contract.
`brute_force_occurrences` / `brute_force_candidates`: every decision with its document, and each
token's chosen set and capped certifying counts computed with Python counters (the reference the
vectorised table builder is checked against).

A small, obviously-correct reference: it records every routing decision with `RoutingRecorder`
and reduces them in one pass at the end (bincount / index_add_ / a pandas groupby for the modal
set). Used by the tests to build tables from a real (tiny) model, and as a cross-check of the
streaming capture. Not meant for large corpora: it keeps every decision in memory.

    df, meta = brute_force_stats(model, batches)   # batches: iterable of (input_ids, attention_mask)

Used by `tests/test_var_tables.py` and `tests/test_var_verification.py`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch

from var_moe.adapters import get_adapter
from var_moe.capture.recorder import RoutingRecorder


@torch.no_grad()
def brute_force_stats(model: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], split: str = "calibration") -> tuple[Any, dict]:
    import pandas as pd

    adapter = get_adapter(model)
    e, k, vocab = adapter.num_experts, adapter.top_k, int(model.config.vocab_size)
    seen: dict[int, list[tuple[torch.Tensor, ...]]] = {}

    def callback(layer: int, tokens: Any, decision: Any) -> None:
        v = tokens.valid_T
        seen.setdefault(layer, []).append((tokens.ids_T[v], decision.probs_TE[v], decision.topk_idx_TK[v].long(),
                                           decision.topk_w_TK[v].float()))

    with RoutingRecorder(model, callback=callback):
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)

    frames = []
    for layer, parts in sorted(seen.items()):
        ids_T = torch.cat([p[0] for p in parts])
        probs_TE = torch.cat([p[1] for p in parts]).double()
        idx_TK = torch.cat([p[2] for p in parts])
        w_TK = torch.cat([p[3] for p in parts]).double()
        freq_V = torch.bincount(ids_T, minlength=vocab)
        ent_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(1)
        ent_sum = torch.zeros(vocab, dtype=torch.float64).index_add_(0, ids_T, ent_T)
        ent_sq = torch.zeros(vocab, dtype=torch.float64).index_add_(0, ids_T, ent_T**2)
        conf_T = probs_TE.max(1).values
        conf_sum = torch.zeros(vocab, dtype=torch.float64).index_add_(0, ids_T, conf_T)
        onehot_TE = torch.zeros(len(ids_T), e, dtype=torch.float64).scatter_(1, idx_TK, 1.0)
        counts_VE = torch.zeros(vocab, e, dtype=torch.float64).index_add_(0, ids_T, onehot_TE)
        wsum_VE = torch.zeros(vocab, e, dtype=torch.float64).index_add_(
            0, ids_T, torch.zeros(len(ids_T), e, dtype=torch.float64).scatter_(1, idx_TK, w_TK))
        sets_TK = idx_TK.sort(1).values
        code_T = (sets_TK * torch.tensor([e**i for i in range(k)])).sum(1)
        pairs = pd.DataFrame({"tok": ids_T.numpy(), "code": code_T.numpy()})
        sizes = pairs.groupby(["tok", "code"]).size().reset_index(name="n")
        # modal set: the most frequent; ties -> the smallest code (deterministic)
        sizes = sizes.sort_values(["tok", "n", "code"], ascending=[True, False, True]).drop_duplicates("tok")
        toks = sizes["tok"].to_numpy().copy()
        codes = torch.as_tensor(sizes["code"].to_numpy().copy())
        modal = torch.stack([(codes // e**i) % e for i in range(k)], 1)
        n = freq_V[toks].double()
        mean_ent = ent_sum[toks] / n
        frames.append(pd.DataFrame({
            "layer": np.full(len(toks), layer, dtype=np.int32),
            "token_id": toks.astype(np.int32),
            "frequency": n.long().numpy(),
            "mean_entropy": mean_ent.numpy(),
            "std_entropy": (ent_sq[toks] / n - mean_ent**2).clamp_min(0).sqrt().numpy(),
            "mean_confidence": (conf_sum[toks] / n).numpy(),
            "topk_counts": list(counts_VE[toks].long().numpy()),
            "topk_weight_sums": list(wsum_VE[toks].numpy()),
            "modal_topk_set": list(modal.int().numpy()),
            "modal_set_count": sizes["n"].to_numpy().astype(np.int64),
        }))
    df = pd.concat(frames, ignore_index=True)
    meta = {"model": str(getattr(model.config, "_name_or_path", "")), "model_type": model.config.model_type,
            "vocab_size": vocab, "num_experts": e, "top_k": k, "split": split,
            "max_entropy_nats": math.log(e), "num_tokens": int(df[df.layer == df.layer.min()].frequency.sum())}
    return df, meta


@torch.no_grad()
def brute_force_occurrences(model: Any, batches: list) -> dict[int, list[tuple[int, int, int, tuple[int, ...], float]]]:
    """Every valid routing decision as (doc, prev, token, sorted set, entropy) per layer, in
    plain Python (batches: `EvalBatch`-like objects with .ids, .mask, .doc_B)."""
    out: dict[int, list] = {}
    current: dict[str, Any] = {}

    def callback(layer: int, tokens: Any, decision: Any) -> None:
        s = tokens.seq_len
        probs = decision.probs_TE.double()
        ent = (-(probs * probs.clamp_min(1e-30).log()).sum(1)).tolist()
        for r, (tok, prev, ok) in enumerate(zip(tokens.ids_T.tolist(), tokens.prev_T.tolist(), tokens.valid_T.tolist())):
            if ok:  # a loop over tokens is fine in a brute-force reference
                out.setdefault(layer, []).append((current["doc_B"][r // s], prev, tok,
                                                  tuple(sorted(decision.topk_idx_TK[r].tolist())), ent[r]))

    with RoutingRecorder(model, callback=callback, window=1):
        for b in batches:
            current["doc_B"] = list(b.doc_B)
            model(input_ids=b.ids, attention_mask=b.mask, use_cache=False)
    return out


def brute_force_candidates(occ: list, cap: int | None, min_freq: int, max_entropy: float | None,
                           chooser_occ: list | None = None) -> dict[int, dict]:
    """Per token: modal set on even documents (ties -> smallest), eligibility, capped certifying
    counts on odd ones; with `chooser_occ`, the set is chosen on all of those occurrences and
    certified on all of `occ`."""
    from collections import Counter, defaultdict

    sel: dict[int, Counter] = defaultdict(Counter)
    ent: dict[int, list] = defaultdict(list)
    cert: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    choosing = occ if chooser_occ is None else chooser_occ
    for doc, _prev, tok, st, e in choosing:
        if chooser_occ is not None or doc % 2 == 0:
            sel[tok][st] += 1
            ent[tok].append(e)
    for doc, _prev, tok, st, e in occ:
        if chooser_occ is not None or doc % 2 == 1:
            cert[tok][doc].append(st)
    out = {}
    for tok, counter in sel.items():
        best = max(counter.values())
        modal = min(s for s, c in counter.items() if c == best)
        agree = total = 0.0
        for sets in cert[tok].values():
            n = len(sets)
            a = sum(1 for s in sets if s == modal)
            w = n if cap is None else min(n, cap)
            agree += a * w / n
            total += w
        freq = sum(counter.values())
        eligible = freq >= min_freq and (max_entropy is None or sum(ent[tok]) / freq <= max_entropy) and total > 0
        out[tok] = {"modal": modal, "agree": agree, "total": total, "eligible": eligible}
    return out


def brute_force_bh(pvals: list[float], keys: list, alpha: float) -> set:
    """Benjamini-Hochberg by hand: the keys of the r smallest p-values, r the largest rank i with
    p_(i) <= alpha * i / m."""
    m = len(pvals)
    ranked = sorted(range(m), key=lambda i: pvals[i])
    r = max([i + 1 for i, j in enumerate(ranked) if pvals[j] <= alpha * (i + 1) / m], default=0)
    return {keys[j] for j in ranked[:r]}
