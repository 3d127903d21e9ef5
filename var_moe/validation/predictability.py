"""Held-out routing predictability: tables from the calibration split, scored on the test split.

`heldout_predictability(model, calib_batches, test_batches, config) -> dict` runs the model twice
under a `RoutingRecorder` (the router's own outputs, padding masked): once over calibration batches
to collect routing evidence and build the tables artifact from it (`var_moe.var.evidence` /
`var_moe.var.tables.VARTables.from_evidence` with sets chosen on all calibration sequences, the
same module the router's tables come from), once over test batches to score,
per layer and every valid test token, these predictors of the token's real top-k set S:

- token_table: the token's modal calibration set; unseen tokens fall back to global_set,
- pair_table:  the modal set of (previous token, token) if the pair was seen >= min_pair_count
               times in calibration, else token_table,
- global_set:  the single most frequent calibration set,
- lru_k / lru_2k: per sequence (batch row) and layer, the k (2k) experts most recently used by
               earlier tokens of the same sequence (empty at a sequence start; the experts of one
               token are inserted highest weight last, i.e. most recent).

Metrics: exact = predicted set == S (for an LRU cache: S is a subset of the cache, which for size
k is the same thing); top1 = the expert with the highest routing weight is in the prediction;
overlap = |prediction & S| / k (overlap at k). With fine-grained experts (10^12 possible sets for
128 experts, top-8) exact agreement is near zero for any predictor, so the measures that mean
something there treat every (token, expert) as one decision: precision = sum |prediction & S| /
sum |prediction| and recall = sum |prediction & S| / sum |S| (pooled over tokens; recall equals the
mean overlap), their per-expert forms averaged over experts (`expert_precision_macro` over experts
ever predicted, `expert_recall_macro` over experts ever chosen: rare experts count as much as
common ones), and weight = the share of the token's routing weight that the predicted experts
carry (sum of S's weights on predicted experts / sum of S's weights). The LRU is vectorised too: each expert's last-use position comes
from a `cummax` over positions, and the cache is the top-c experts by recency.

Intervals: the scorer also keeps per-sequence sums (`bincount` over the batch row of every valid
token), folded into per-DOCUMENT counts (tokens per layer; exact and top1 hits per layer and
predictor) -- test batches given as `EvalBatch`es carry each sequence's document, bare
`(ids, mask)` batches count each sequence as its own document. Every row gets `exact_ci95` and
`top1_ci95`, 95% percentile intervals from resampling test documents with replacement
(`validation.bootstrap`), and with a control each trained row gets `exact_margin_ci95`, the
trained-minus-control difference resampled on the same documents (paired). The counts are written
to the report (`per_document`) so the intervals can be recomputed.

`random_init_control(model, seed)` builds the control: the same config with seeded random weights.
The library never loops over tokens. Test: `pytest tests/test_validation_predictability.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import torch

from ..adapters import RouterDecision, get_adapter
from ..capture.recorder import RoutingRecorder
from ..errors import InvalidInputError
from ..token_tracker import TokenBatch
from ..var.config import VARConfig
from ..var.evaluate import EvalBatch
from ..var.evidence import collect_evidence
from ..var.tables import VARTables
from .bootstrap import difference_ci95, document_resamples, ratio_ci95

PREDICTORS = ("token_table", "pair_table", "global_set", "lru_k", "lru_2k")
DEFINITIONS = {
    "token_table": "modal calibration top-k set of the token; tokens unseen in calibration use global_set",
    "pair_table": "modal calibration set of (previous token, token) when the pair occurred >= min_pair_count times in calibration, else token_table",
    "global_set": "the single most frequent top-k set of the layer in calibration",
    "lru_k": "cache of the k experts most recently used by earlier tokens of the same sequence (per layer; empty at the sequence start)",
    "lru_2k": "same with 2k experts (caches twice the experts, so it is not a k-expert prediction)",
    "exact": "predicted set equals the true top-k set (LRU: true set contained in the cache)",
    "top1": "the expert with the highest routing weight lies in the prediction",
    "overlap": "|prediction & true top-k set| / k",
    "precision": "pooled over tokens: sum |prediction & true set| / sum |prediction| (each predicted expert one decision)",
    "recall": "pooled over tokens: sum |prediction & true set| / sum |true set| (equals the mean overlap)",
    "weight": "share of the token's routing weight carried by the predicted experts",
    "expert_precision_macro": "per expert e: times e was predicted and chosen / times e was predicted; averaged over experts predicted at least once",
    "expert_recall_macro": "per expert e: times e was predicted and chosen / times e was chosen; averaged over experts chosen at least once",
    "control": "same architecture and config with seeded random weights, its own calibration tables",
}


class Predictor:
    """Phase 1 predictions from one layer of a `VARTables` artifact (sorted sets)."""

    def __init__(self, tables: VARTables, layer: int):
        t = tables.layers[layer]
        self.vocab_size = int(t.experts_VK.shape[0])
        self.token_sets_VK = torch.where((t.select_V > 0)[:, None], t.experts_VK.sort(1).values,
                                         torch.full_like(t.experts_VK, -1))
        self.global_set_K = tables.global_sets[layer].sort().values
        keys, sets, _ = tables.pairs[layer]
        self.pair_keys_P, self.pair_sets_PK = keys, sets.sort(1).values

    def token_predict(self, ids_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sets_TK, hit_T): the token's modal set, or the global set when the token is unknown."""
        inside = (ids_T >= 0) & (ids_T < self.vocab_size)
        sets = self.token_sets_VK[ids_T.clamp(0, self.vocab_size - 1)]
        hit = inside & (sets[:, 0] >= 0)
        return torch.where(hit[:, None], sets, self.global_set_K.expand_as(sets)), hit

    def pair_predict(self, prev_T: torch.Tensor, ids_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sets_TK, hit_T): the pair's modal set, else the token table's prediction."""
        fallback, _ = self.token_predict(ids_T)
        if self.pair_keys_P.numel() == 0:
            return fallback, torch.zeros_like(ids_T, dtype=torch.bool)
        key_T = prev_T * self.vocab_size + ids_T
        pos_T = torch.searchsorted(self.pair_keys_P, key_T).clamp_max(self.pair_keys_P.numel() - 1)
        hit = (prev_T >= 0) & (self.pair_keys_P[pos_T] == key_T)
        return torch.where(hit[:, None], self.pair_sets_PK[pos_T], fallback), hit


@dataclass(frozen=True)
class PredictabilityConfig:
    min_pair_count: int = 2  # a pair seen fewer times in calibration falls back to the token table
    control_seed: int = 0  # seed of the random-init control's weights
    resamples: int = 2000  # bootstrap resamples of test documents for the 95% intervals
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        if self.min_pair_count < 1:
            raise InvalidInputError(f"--min-pair-count must be at least 1, got {self.min_pair_count}")
        if self.resamples < 10:
            raise InvalidInputError(f"--resamples must be at least 10, got {self.resamples}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PredictabilityConfig":
        return cls(**json.loads(text))


def true_sets(decision: RouterDecision) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted top-k set_TK, its routing weights_TK in the same order, top-1 expert_T = the
    highest-weight chosen expert)."""
    idx_TK = decision.topk_idx_TK.long()
    w_TK = decision.topk_w_TK.float()
    top1_T = idx_TK.gather(1, w_TK.argmax(dim=1, keepdim=True))[:, 0]
    sets_TK, order = torch.sort(idx_TK, dim=1)
    return sets_TK, w_TK.gather(1, order), top1_T


def score_experts(pred_TE: torch.Tensor, sets_TK: torch.Tensor, top1_T: torch.Tensor, w_TK: torch.Tensor,
                  exact_T: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token scores of a prediction given as a bool (T, E) mask of experts (see the module
    docstring); `tp` / `predicted` are per-token counts for the pooled precision."""
    k = sets_TK.shape[1]
    inside_TK = pred_TE.gather(1, sets_TK)
    tp_T = inside_TK.sum(dim=1).float()
    return {"exact": exact_T.float(),
            "top1": pred_TE.gather(1, top1_T[:, None])[:, 0].float(),
            "overlap": tp_T / k,
            "weight": (w_TK * inside_TK).sum(dim=1) / w_TK.sum(dim=1).clamp_min(1e-30),
            "tp": tp_T,
            "predicted": pred_TE.sum(dim=1).float()}


def score_sets(pred_TK: torch.Tensor, sets_TK: torch.Tensor, top1_T: torch.Tensor, w_TK: torch.Tensor,
               num_experts: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scores of a k-set prediction (both sorted), and its (T, E) expert mask."""
    pred_TE = torch.zeros(pred_TK.shape[0], num_experts, dtype=torch.bool, device=pred_TK.device)
    pred_TE.scatter_(1, pred_TK, True)
    return score_experts(pred_TE, sets_TK, top1_T, w_TK, (pred_TK == sets_TK).all(dim=1)), pred_TE


def lru_cache_BSE(idx_BSK: torch.Tensor, w_BSK: torch.Tensor, valid_BS: torch.Tensor, num_experts: int,
                  size: int) -> torch.Tensor:
    """Bool (B, S, E): experts in the per-sequence LRU cache of `size` BEFORE each position."""
    b, s, k = idx_BSK.shape
    # recency code of a use: position * (K + 1) + weight rank (K = highest weight = inserted last)
    wrank_BSK = torch.argsort(torch.argsort(w_BSK.float(), dim=2), dim=2) + 1
    pos_BS1 = torch.arange(s, device=idx_BSK.device)[None, :, None]
    code_BSK = torch.where(valid_BS[:, :, None], pos_BS1 * (k + 1) + wrank_BSK, torch.full_like(wrank_BSK, -1))
    use_BSE = torch.full((b, s, num_experts), -1, dtype=torch.long, device=idx_BSK.device)
    use_BSE.scatter_reduce_(2, idx_BSK.long(), code_BSK.long(), "amax")
    last_BSE = torch.cummax(use_BSE, dim=1).values
    before_BSE = torch.cat([torch.full_like(last_BSE[:, :1], -1), last_BSE[:, :-1]], dim=1)
    c = min(size, num_experts)
    val_BSC, slot_BSC = torch.topk(before_BSE, c, dim=2)
    cache_BSE = torch.zeros((b, s, num_experts), dtype=torch.bool, device=idx_BSK.device)
    cache_BSE.scatter_(2, slot_BSC, val_BSC >= 0)
    return cache_BSE


def score_cache(cache_TE: torch.Tensor, sets_TK: torch.Tensor, top1_T: torch.Tensor,
                w_TK: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of a cache (exact: the whole true set is cached)."""
    return score_experts(cache_TE, sets_TK, top1_T, w_TK, cache_TE.gather(1, sets_TK).all(dim=1))


DOC_METRICS = ("exact", "top1")  # metrics kept per document (0/1 per token, so the sums are hit counts)
TOKEN_METRICS = ("exact", "top1", "overlap", "weight")  # means over tokens
POOLED = ("precision", "recall", "expert_precision_macro", "expert_recall_macro")  # ratios of pooled counts
METRICS = TOKEN_METRICS + POOLED


class _Scorer:
    """Accumulates metric sums per (layer, predictor) over the test pass, and per-sequence sums
    of the DOC_METRICS for the bootstrap (`batch_docs[i]`: document of each row of batch i)."""

    def __init__(self, tables: VARTables, num_experts: int, top_k: int, batch_docs: list[list[int]] | None = None):
        self.tables = {layer: Predictor(tables, layer) for layer in tables.layers}
        self.names = PREDICTORS
        self.num_experts = num_experts
        self.top_k = top_k
        self.sums: dict[tuple[int, str], dict[str, float]] = {}
        self.expert_counts: dict[tuple[int, str], torch.Tensor] = {}  # (3, E): predicted & chosen, predicted, chosen
        self.hits: dict[tuple[int, str], float] = {}
        self.num_tokens = 0
        self.batch_docs = batch_docs
        self.seq_docs: list[int] = []  # document of every test sequence, in order
        self.seq_tokens: dict[int, list[torch.Tensor]] = {}  # layer -> per-batch (B,) valid token counts
        self.seq_sums: dict[tuple[int, str, str], list[torch.Tensor]] = {}  # (layer, predictor, metric) -> (B,) sums
        self._row_T = torch.zeros(0, dtype=torch.long)  # batch row of each valid token of the batch in flight
        self._b = 0  # its batch size

    def _add(self, layer: int, name: str, scores: dict[str, torch.Tensor], pred_TE: torch.Tensor, sets_TK: torch.Tensor,
             hit: torch.Tensor | None = None) -> None:
        acc = self.sums.setdefault((layer, name), {m: 0.0 for m in (*TOKEN_METRICS, "tp", "predicted", "n")})
        for key, v in scores.items():
            acc[key] += float(v.sum())
        acc["n"] += float(scores["exact"].numel())
        e = self.num_experts
        inside_TK = pred_TE.gather(1, sets_TK)
        counts = self.expert_counts.setdefault((layer, name), torch.zeros(3, e, dtype=torch.float64))
        counts[0] += torch.bincount(sets_TK[inside_TK], minlength=e).double()
        counts[1] += pred_TE.sum(dim=0).double()
        counts[2] += torch.bincount(sets_TK.reshape(-1), minlength=e).double()
        if hit is not None:
            self.hits[(layer, name)] = self.hits.get((layer, name), 0.0) + float(hit.float().sum())
        for m in DOC_METRICS:
            self.seq_sums.setdefault((layer, name, m), []).append(
                torch.bincount(self._row_T, weights=scores[m].double(), minlength=self._b))

    def _metrics(self, acc: dict[str, float], counts: torch.Tensor) -> dict[str, float]:
        n = max(acc["n"], 1.0)
        tp_E, pred_E, true_E = counts
        out = {m: acc[m] / n for m in TOKEN_METRICS}
        out["precision"] = acc["tp"] / acc["predicted"] if acc["predicted"] else float("nan")
        out["recall"] = acc["tp"] / (n * self.top_k)
        out["expert_precision_macro"] = float((tp_E[pred_E > 0] / pred_E[pred_E > 0]).mean()) if (pred_E > 0).any() else float("nan")
        out["expert_recall_macro"] = float((tp_E[true_E > 0] / true_E[true_E > 0]).mean()) if (true_E > 0).any() else float("nan")
        return out

    def _start_batch(self, b: int) -> None:
        i = len(self.seq_tokens.get(min(self.tables), []))  # batches seen so far
        if self.batch_docs is None:
            docs = list(range(len(self.seq_docs), len(self.seq_docs) + b))  # each sequence its own document
        else:
            if i >= len(self.batch_docs) or len(self.batch_docs[i]) != b:
                raise InvalidInputError("test batches and their document ids disagree")
            docs = list(self.batch_docs[i])
        self.seq_docs.extend(docs)

    def __call__(self, layer: int, tokens: TokenBatch, decision: RouterDecision) -> None:
        valid_T = tokens.valid_T.bool()
        sets_TK, w_TK, top1_T = true_sets(decision)
        tab = self.tables[layer]
        ids_T, prev_T = tokens.ids_T[valid_T].long(), tokens.prev_T[valid_T].long()
        s_TK, t1_T, sw_TK = sets_TK[valid_T], top1_T[valid_T], w_TK[valid_T]
        E = self.num_experts
        self._b = tokens.batch_size
        if layer == min(self.tables):
            self.num_tokens += int(valid_T.sum())
            self._start_batch(tokens.batch_size)
        # batch row of every valid token (rows are contiguous in the flattened T axis)
        self._row_T = torch.arange(tokens.batch_size, device=valid_T.device).repeat_interleave(tokens.seq_len)[valid_T]
        self.seq_tokens.setdefault(layer, []).append(torch.bincount(self._row_T, minlength=tokens.batch_size))
        pred, hit = tab.token_predict(ids_T)
        self._add(layer, "token_table", *score_sets(pred, s_TK, t1_T, sw_TK, E), s_TK, hit)
        pred, hit = tab.pair_predict(prev_T, ids_T)
        self._add(layer, "pair_table", *score_sets(pred, s_TK, t1_T, sw_TK, E), s_TK, hit)
        self._add(layer, "global_set", *score_sets(tab.global_set_K.expand_as(s_TK), s_TK, t1_T, sw_TK, E), s_TK)
        b, s, k = tokens.batch_size, tokens.seq_len, self.top_k
        idx_BSK = decision.topk_idx_TK.long().reshape(b, s, k)
        w_BSK = decision.topk_w_TK.reshape(b, s, k)
        for name, size in (("lru_k", k), ("lru_2k", 2 * k)):
            cache_TE = lru_cache_BSE(idx_BSK, w_BSK, tokens.valid_T.bool().reshape(b, s), self.num_experts, size)
            cache_TE = cache_TE.reshape(b * s, -1)[valid_T]
            self._add(layer, name, score_cache(cache_TE, s_TK, t1_T, sw_TK), cache_TE, s_TK)

    def per_document(self) -> dict[str, Any]:
        """Per-document counts: document ids (sorted), tokens_LD, and {predictor: {metric: sums_LD}}."""
        docs, inv_S = np.unique(np.asarray(self.seq_docs, dtype=np.int64), return_inverse=True)
        layers = sorted(self.seq_tokens)

        def fold(parts: list[torch.Tensor]) -> np.ndarray:  # per-sequence sums -> per-document sums
            return np.bincount(inv_S, weights=torch.cat(parts).double().cpu().numpy(), minlength=len(docs))

        tokens_LD = np.stack([fold(self.seq_tokens[layer]) for layer in layers])
        hits = {name: {m: np.stack([fold(self.seq_sums[(layer, name, m)]) for layer in layers]) for m in DOC_METRICS}
                for name in self.names}
        return {"layers": layers, "document_ids": docs, "tokens_LD": tokens_LD, "hits": hits}

    def rows(self, model_name: str) -> list[dict[str, Any]]:
        out = []
        layers = sorted({layer for layer, _ in self.sums})
        for name in self.names:
            total = {m: 0.0 for m in (*TOKEN_METRICS, "tp", "predicted", "n")}
            per_layer_counts = []  # "all": the per-expert averages run over (layer, expert) pairs
            hit_total = 0.0
            for layer in layers:
                acc, counts = self.sums[(layer, name)], self.expert_counts[(layer, name)]
                row = {"model": model_name, "layer": layer, "predictor": name, "n": int(acc["n"]),
                       **self._metrics(acc, counts)}
                if (layer, name) in self.hits:
                    row["table_hit"] = self.hits[(layer, name)] / max(acc["n"], 1.0)
                    hit_total += self.hits[(layer, name)]
                out.append(row)
                for m in total:
                    total[m] += acc[m]
                per_layer_counts.append(counts)
            row = {"model": model_name, "layer": "all", "predictor": name, "n": int(total["n"]),
                   **self._metrics(total, torch.cat(per_layer_counts, dim=1))}
            if name.endswith("_table"):
                row["table_hit"] = hit_total / max(total["n"], 1.0)
            out.append(row)
        return out


def _run(model: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], callback: Any) -> None:
    device = next(model.parameters()).device
    with RoutingRecorder(model, callback=callback, window=1), torch.no_grad():
        for input_ids, mask in batches:
            model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)


def as_documents(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[EvalBatch]:
    """(ids, mask) batches as `EvalBatch`es, each sequence its own document (ids in order)."""
    out, n = [], 0
    for ids, mask in batches:
        out.append(EvalBatch(ids, mask, list(range(n, n + ids.shape[0]))))
        n += ids.shape[0]
    return out


def calibrate(model: Any, batches: Iterable, config: PredictabilityConfig) -> tuple[VARTables, int]:
    """One pass over calibration batches -> the tables artifact (sets chosen on every calibration
    sequence, nothing certified: Phase 1 scores predictability, not served entries) and the token count."""
    adapter = get_adapter(model)
    evidence = collect_evidence(model, as_documents(batches), adapter)
    tables = VARTables.from_evidence(evidence, model, adapter, VARConfig(), min_pair_count=config.min_pair_count,
                                     choose="all", source="calibration pass")
    return tables, int(evidence.metadata["num_tokens"])


def score_predictors(model: Any, tables: VARTables, batches: Iterable, model_name: str,
                     batch_docs: list[list[int]] | None = None) -> tuple[list[dict], int, dict[str, Any]]:
    """Scores every predictor on the test batches (one pass): rows, token count, per-document counts."""
    adapter = get_adapter(model)
    scorer = _Scorer(tables, adapter.num_experts, adapter.top_k, batch_docs)
    _run(model, batches, scorer)
    return scorer.rows(model_name), scorer.num_tokens, scorer.per_document()


def add_intervals(rows: list[dict[str, Any]], per_doc: dict[str, dict[str, Any]], resamples: int,
                  seed: int) -> dict[str, Any]:
    """Adds `<metric>_ci95` to every row (and `exact_margin_ci95` to trained rows when a control was
    scored), resampling test documents; returns the per-document counts as JSON-ready lists."""
    first = next(iter(per_doc.values()))
    layers, tokens_LD = first["layers"], first["tokens_LD"]
    pick_RD = document_resamples(tokens_LD.shape[1], resamples, seed)

    def counts(model: str, layer: Any, name: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        hits_LD = per_doc[model]["hits"][name][metric]
        if layer == "all":  # layers pooled per document, as in the point estimate
            return hits_LD.sum(0), tokens_LD.sum(0)
        i = layers.index(layer)
        return hits_LD[i], tokens_LD[i]

    for r in rows:
        for m in DOC_METRICS:
            num_D, den_D = counts(r["model"], r["layer"], r["predictor"], m)
            r[f"{m}_ci95"] = ratio_ci95(num_D, den_D, pick_RD)
        if r["model"] == "trained" and "control" in per_doc:
            (t_D, den_D), (c_D, _) = (counts(mod, r["layer"], r["predictor"], "exact") for mod in ("trained", "control"))
            r["exact_margin_ci95"] = difference_ci95(t_D, c_D, den_D, pick_RD)
    as_int = lambda a: np.rint(a).astype(np.int64).tolist()  # noqa: E731 -- the sums are counts
    return {"unit": "test document", "resamples": resamples, "seed": seed, "documents": int(tokens_LD.shape[1]),
            "layers": layers, "document_ids": first["document_ids"].tolist(), "tokens_LD": as_int(tokens_LD),
            "hits_LD": {model: {name: {m: as_int(v) for m, v in d["hits"][name].items()} for name in d["hits"]}
                        for model, d in per_doc.items()}}


def _split_docs(batches: list) -> tuple[list, list[list[int]] | None]:
    """(ids, mask) batches and each row's document; EvalBatches carry it, bare tuples do not (None)."""
    if batches and all(isinstance(b, EvalBatch) for b in batches):
        return [(b.ids, b.mask) for b in batches], [list(b.doc_B) for b in batches]
    return batches, None


def random_init_control(model: Any, seed: int = 0) -> Any:
    """Same architecture and config, seeded random weights, same dtype and device, eval mode."""
    from transformers import AutoModelForCausalLM

    param = next(model.parameters())
    torch.manual_seed(seed)
    control = AutoModelForCausalLM.from_config(model.config)
    return control.to(device=param.device, dtype=param.dtype).eval()


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        if r["layer"] == "all":
            out.setdefault(r["model"], {})[r["predictor"]] = {m: r[m] for m in METRICS}
    if "trained" in out and "control" in out:
        out["margin_trained_minus_control"] = {
            p: {m: out["trained"][p][m] - out["control"][p][m] for m in METRICS}
            for p in out["trained"] if p in out["control"]}
    return out


def heldout_predictability(model: Any, calib_batches: list, test_batches: list,
                           config: PredictabilityConfig | None = None, control: str | None = None,
                           info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The held-out report for `model` (and its random-init control when control == "random-init").
    `test_batches`: `EvalBatch`es (documents known) or (ids, mask) tuples (each sequence a document)."""
    config = config or PredictabilityConfig()
    if control not in (None, "none", "random-init"):
        raise InvalidInputError(f"--control must be 'random-init' or 'none', got {control!r}")
    adapter = get_adapter(model)
    test_batches, batch_docs = _split_docs(list(test_batches))
    tables, n_cal = calibrate(model, calib_batches, config)
    rows, n_test, docs = score_predictors(model, tables, test_batches, "trained", batch_docs)
    per_doc = {"trained": docs}
    if control == "random-init":
        ctrl = random_init_control(model, config.control_seed)
        ctrl_tables, _ = calibrate(ctrl, calib_batches, config)
        ctrl_rows, _, per_doc["control"] = score_predictors(ctrl, ctrl_tables, test_batches, "control", batch_docs)
        rows += ctrl_rows
        del ctrl
    per_document = add_intervals(rows, per_doc, config.resamples, config.bootstrap_seed)
    return {
        **(info or {}),
        "num_experts": adapter.num_experts, "top_k": adapter.top_k,
        "num_tokens_calibration": n_cal, "num_tokens_test": n_test,
        "config": json.loads(config.to_json()), "control": control if control != "none" else None,
        "predictors": list(PREDICTORS),
        "definitions": DEFINITIONS,
        "random_exact_baseline": 1.0 / _comb(adapter.num_experts, adapter.top_k),
        "intervals": "exact_ci95 / top1_ci95: 95% percentile bootstrap over test documents (resampled with "
                     "replacement, the same resamples for every row); exact_margin_ci95: trained minus control, paired",
        "rows": rows, "summary": _summary(rows), "per_document": per_document,
    }


def _comb(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)
