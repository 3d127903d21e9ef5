"""Expert predictors for offloading: each predicts every layer's expert set, with a stated lead time.

Every predictor returns `pred_TLK` (int16, -1 = no prediction for that token and layer):
- `var`: the served VAR token tables (`models/<m>/var/var_tables.safetensors`): for a token whose
  entry at layer l passed verification, its modal set. Known from the token id alone, so before
  layer 0 runs: lead = l layers (plus layer l's attention) for layer l.
- `token_modal`: the modal set of the token at each layer in a calibration trace, for every token
  seen at least `min_count` times with that set (no verification): the coverage/precision trade
  the tables' admission rule makes, seen from the other side. Lead as `var`.
- `var_pair`: the modal set per (previous token, token) key. Read from the tables artifact when it
  holds pair tables (`VARTables.pairs`: keys prev * V + token, the pair's modal set on the even
  calibration documents, pairs seen at least the artifact's `min_pair_count` times; unverified);
  built from a calibration trace (modal set seen at least `min_count` times) only when the
  artifact has none. `all_predictions(..., info=)` says which was used. Lead as `var`.
- `speculative`: layer l's router on the hidden state entering layer l-1's MoE block, recorded in
  the trace (Mixtral-offloading's prefetch). Lead = 1 layer; none at layer 0.
- `prev_token`: the experts the previous token of the sequence used at the same layer. Lead = one
  whole token (L layers); none at a sequence start.
- `oracle`: the true set (lead unbounded); the ceiling for any prefetcher.

`accuracy(pred_TLK, true_TLK)` gives per layer: coverage (share of tokens with a prediction),
precision and recall on covered tokens, and recall over all tokens (no prediction = nothing
prefetched). Vectorised throughout (unique / searchsorted on encoded keys). Every access to the
VAR tables artifact is in `load_table_sets` / `load_pair_table` so it is easy to adapt when the tables module changes.

Test: `pytest tests/test_offload_predictors.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from .trace import Trace

PREDICTORS = ("var", "token_modal", "var_pair", "speculative", "prev_token", "oracle")
DEFAULT_MIN_COUNT = 3


def lead_layers(predictor: str, layer: int, num_layers: int) -> float:
    """Layers of compute between the moment a prediction is known and layer `layer`'s routing."""
    if predictor in ("var", "token_modal", "var_pair"):
        return float(layer)  # known at token start; layer l routes after l layers (+ its own attention)
    if predictor == "speculative":
        return 1.0 if layer > 0 else float("nan")
    if predictor == "prev_token":
        return float(num_layers)
    if predictor == "oracle":
        return float("inf")
    raise InvalidInputError(f"unknown predictor {predictor!r}; known: {', '.join(PREDICTORS)}")


# -- the VAR tables artifact: the one place that reads it ---------------------------------------
def load_table_sets(tables_path: str | Path, layers: list[int], vocab_size: int | None = None,
                    num_experts: int | None = None, top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(member_LV, experts_LVK)` of the served VAR tables for the trace's `layers` (decoder indices).

    Layers the tables do not cover get no members. The tables' model identity must match the
    trace's (vocabulary, experts, top-k) where the trace states it."""
    from ..var.tables import VARTables

    tables = VARTables.load(tables_path)
    meta = tables.metadata
    for key, want in (("vocab_size", vocab_size), ("num_experts", num_experts), ("top_k", top_k)):
        if want is not None and meta.get(key) is not None and int(meta[key]) != int(want):
            raise InvalidInputError(f"VAR tables {tables_path} were built for {key}={meta[key]} but the trace has {want}")
    vocab, k = int(meta["vocab_size"]), int(meta["top_k"])
    member_LV = np.zeros((len(layers), vocab), dtype=bool)
    experts_LVK = np.full((len(layers), vocab, k), -1, dtype=np.int16)
    for i, layer in enumerate(layers):
        if layer in tables.layers:
            t = tables[layer]
            member_LV[i] = t.member_V.numpy().astype(bool)
            experts_LVK[i] = t.experts_VK.numpy().astype(np.int16)
    return member_LV, experts_LVK


def load_pair_table(tables_path: str | Path, layers: list[int], num_experts: int, top_k: int) -> ModalTable | None:
    """The artifact's (previous, token) tables as a `ModalTable` for the trace's `layers`, or None
    when the artifact holds none. Its keys (prev * V + token) are re-encoded as this module's
    (prev << 32) + token; a layer the artifact lacks gets no keys."""
    from ..var.served import split_key
    from ..var.tables import VARTables

    tables = VARTables.load(tables_path)
    if not tables.pairs:
        return None
    meta = tables.metadata
    if int(meta["num_experts"]) != int(num_experts) or int(meta["top_k"]) != int(top_k):
        raise InvalidInputError(f"VAR tables {tables_path} were built for num_experts={meta['num_experts']}, "
                                f"top_k={meta['top_k']} but the trace has {num_experts}, {top_k}")
    vocab = int(meta["vocab_size"])
    keys, codes, counts = [], [], []
    for layer in layers:
        empty = (np.zeros(0, np.int64), np.zeros((0, top_k), np.int64), np.zeros(0, np.int64))
        keys_P, sets_PK, counts_P = (t.numpy().astype(np.int64) for t in tables.pairs[layer]) if layer in tables.pairs else empty
        _, prev_P, tok_P = split_key(keys_P, vocab)
        key_P = prev_P * (1 << 32) + tok_P
        order = np.argsort(key_P, kind="stable")
        keys.append(key_P[order])
        codes.append(_set_codes(sets_PK[order], num_experts))
        counts.append(counts_P[order])
    return ModalTable(keys, codes, counts, num_experts, top_k, "pair", int(meta.get("min_pair_count") or 1))


def var_predict(trace: Trace, member_LV: np.ndarray, experts_LVK: np.ndarray) -> np.ndarray:
    """The served token entries' sets (`var.served.decide`, the routers' decision, without pair
    entries: those are `var_pair`'s); -1 where no token entry serves."""
    import torch

    from ..var.served import ServedTables, decide

    ids_T = torch.from_numpy(trace.token_ids_T.astype(np.int64))
    d = decide(ServedTables.token_only(torch.from_numpy(member_LV), torch.from_numpy(experts_LVK)), ids_T, ids_T >= 0)
    pred_TLK = torch.where(d.token_LT.t()[..., None], d.idx_LTK.transpose(0, 1), -1)
    return pred_TLK.numpy().astype(np.int16)


# -- modal-set tables built from a calibration trace ---------------------------------------------
def _set_codes(experts_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """Each row's expert set as the one set code (`capture.router_math.set_codes`)."""
    import torch

    from ..capture.router_math import set_codes

    return set_codes(torch.from_numpy(experts_NK.astype(np.int64)), num_experts).numpy()


def _decode_codes(codes_N: np.ndarray, num_experts: int, k: int) -> np.ndarray:
    import torch

    from ..capture.router_math import decode_set_ids

    return decode_set_ids(torch.from_numpy(np.asarray(codes_N, dtype=np.int64)), num_experts, k).numpy().astype(np.int16)


@dataclass
class ModalTable:
    """Per layer: sorted keys and the modal expert set (code) of each key with enough evidence."""

    keys: list[np.ndarray]  # per layer, sorted int64 keys
    codes: list[np.ndarray]  # per layer, modal set code of each key
    counts: list[np.ndarray]  # per layer, occurrences of the modal set
    num_experts: int
    top_k: int
    key_kind: str  # "token" or "pair"
    min_count: int

    def size(self) -> list[int]:
        return [len(k) for k in self.keys]


def _keys(trace: Trace, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """`(key_T, ok_T)`: token id, or (previous token, token) encoded in one int64."""
    ids_T = trace.token_ids_T.astype(np.int64)
    if kind == "token":
        return ids_T, ids_T >= 0
    prev_T = trace.prev_T.astype(np.int64)
    return prev_T * (1 << 32) + ids_T, (prev_T >= 0) & (ids_T >= 0)


def build_modal_table(calib: Trace, kind: str = "pair", min_count: int = DEFAULT_MIN_COUNT) -> ModalTable:
    """Modal set per key and layer from a calibration trace; keys whose modal set was seen fewer
    than `min_count` times are left out (the minimum evidence)."""
    if kind not in ("token", "pair"):
        raise InvalidInputError(f"modal table key must be 'token' or 'pair', got {kind!r}")
    if min_count < 1:
        raise InvalidInputError(f"--min-count must be >= 1, got {min_count}")
    e, k = calib.num_experts, calib.top_k
    key_T, ok_T = _keys(calib, kind)
    keys, codes, counts = [], [], []
    for i in range(calib.num_layers):
        code_N = _set_codes(calib.experts_TLK[ok_T, i], e)
        key_N = key_T[ok_T]
        pair_keys = np.stack([key_N, code_N], 1)
        uniq, cnt = np.unique(pair_keys, axis=0, return_counts=True)  # sorted by key then code
        # modal code per key: sort by (key, -count, code) and keep the first row of every key
        order = np.lexsort((uniq[:, 1], -cnt, uniq[:, 0]))
        uniq, cnt = uniq[order], cnt[order]
        first = np.r_[True, uniq[1:, 0] != uniq[:-1, 0]]
        keep = first & (cnt >= min_count)
        keys.append(uniq[keep, 0])
        codes.append(uniq[keep, 1])
        counts.append(cnt[keep])
    return ModalTable(keys, codes, counts, e, k, kind, min_count)


def modal_predict(trace: Trace, table: ModalTable) -> np.ndarray:
    if trace.num_layers != len(table.keys) or trace.num_experts != table.num_experts or trace.top_k != table.top_k:
        raise InvalidInputError("the calibration trace and the evaluated trace differ in layers, experts or top-k")
    t, l, k = trace.experts_TLK.shape
    pred = np.full((t, l, k), -1, dtype=np.int16)
    key_T, ok_T = _keys(trace, table.key_kind)
    for i in range(l):
        keys = table.keys[i]
        if len(keys) == 0:
            continue
        pos_T = np.clip(np.searchsorted(keys, key_T), 0, len(keys) - 1)
        hit_T = ok_T & (keys[pos_T] == key_T)
        decoded_TK = _decode_codes(table.codes[i][pos_T], table.num_experts, k)
        pred[:, i] = np.where(hit_T[:, None], decoded_TK, -1)
    return pred


def prev_token_predict(trace: Trace) -> np.ndarray:
    pred = np.full_like(trace.experts_TLK, -1)
    same = trace.seq_T[1:] == trace.seq_T[:-1]
    pred[1:] = np.where(same[:, None, None], trace.experts_TLK[:-1], -1)
    return pred


def speculative_predict(trace: Trace) -> np.ndarray:
    if trace.spec_TLK is None:
        return np.full_like(trace.experts_TLK, -1)
    return trace.spec_TLK.astype(np.int16)


def all_predictions(test: Trace, tables_path: str | Path | None = None, calib: Trace | None = None,
                    min_count: int = DEFAULT_MIN_COUNT, info: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Every predictor that the inputs allow: `var` needs tables, `token_modal` a calibration trace,
    `var_pair` the artifact's pair tables or, when it has none, a calibration trace. `info`, when
    given, receives where each table came from (`var_pair_source`)."""
    preds: dict[str, np.ndarray] = {}
    info = {} if info is None else info
    pair_table = None
    if tables_path is not None:
        member_LV, experts_LVK = load_table_sets(tables_path, test.layers, test.metadata.get("vocab_size"),
                                                 test.num_experts, test.top_k)
        preds["var"] = var_predict(test, member_LV, experts_LVK)
        pair_table = load_pair_table(tables_path, test.layers, test.num_experts, test.top_k)
        if pair_table is not None:
            info["var_pair_source"] = (f"tables artifact {tables_path}: pairs seen >= {pair_table.min_count} times "
                                       "on the even calibration documents")
    if calib is not None:
        preds["token_modal"] = modal_predict(test, build_modal_table(calib, "token", min_count))
        if pair_table is None:
            pair_table = build_modal_table(calib, "pair", min_count)
            info["var_pair_source"] = f"calibration trace: modal set seen >= {min_count} times"
    if pair_table is not None:
        preds["var_pair"] = modal_predict(test, pair_table)
    preds["speculative"] = speculative_predict(test)
    preds["prev_token"] = prev_token_predict(test)
    preds["oracle"] = test.experts_TLK.astype(np.int16)
    return preds


def accuracy(pred_TLK: np.ndarray, true_TLK: np.ndarray) -> dict[str, list[float]]:
    """Per layer: coverage, precision and recall where predicted, recall over all tokens."""
    if pred_TLK.shape[:2] != true_TLK.shape[:2]:
        raise InvalidInputError(f"prediction shape {pred_TLK.shape} does not match the trace {true_TLK.shape}")
    valid_TLP = pred_TLK >= 0
    hit_TLP = valid_TLP & (pred_TLK[..., :, None] == true_TLK[..., None, :]).any(-1)
    covered_TL = valid_TLP.any(-1)
    n_pred_L = valid_TLP.sum((0, 2)).astype(np.float64)
    hits_L = hit_TLP.sum((0, 2)).astype(np.float64)
    k = true_TLK.shape[2]
    cov_tokens_L = covered_TL.sum(0).astype(np.float64)
    t = max(true_TLK.shape[0], 1)
    div = lambda a, b: np.where(b > 0, a / np.maximum(b, 1), np.nan)  # noqa: E731
    return {
        "coverage": (cov_tokens_L / t).tolist(),
        "precision": div(hits_L, n_pred_L).tolist(),
        "recall_covered": div(hits_L, cov_tokens_L * k).tolist(),
        "recall_all": (hits_L / (t * k)).tolist(),
        "exact_covered": div((hit_TLP.sum(-1) == k).sum(0).astype(np.float64), cov_tokens_L).tolist(),
    }


def accuracy_report(test: Trace, preds: dict[str, np.ndarray]) -> dict[str, Any]:
    """`accuracy` of every predictor with its lead per layer; with `var` present, also each
    predictor's precision on the tokens the VAR table covers (are table tokens just easy ones?)."""
    out: dict[str, Any] = {}
    var_TL = preds["var"][..., 0] >= 0 if "var" in preds else None
    for name, pred in preds.items():
        acc = accuracy(pred, test.experts_TLK)
        acc["lead_layers"] = [lead_layers(name, i, test.num_layers) for i in range(test.num_layers)]
        if var_TL is not None:
            on_table = np.where(var_TL[..., None], pred, np.int16(-1))
            acc["precision_on_var_tokens"] = accuracy(on_table, test.experts_TLK)["precision"]
        out[name] = acc
    if var_TL is not None:
        per_token = var_TL.sum(1)
        out["var_token_share"] = {"any_layer": float((per_token > 0).mean()), "all_layers": float((per_token == test.num_layers).mean()),
                                  "mean_layers_covered": float(per_token.mean())}
    return out
