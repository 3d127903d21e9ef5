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
overlap = |prediction & S| / k. The LRU is vectorised too: each expert's last-use position comes
from a `cummax` over positions, and the cache is the top-c experts by recency.

`random_init_control(model, seed)` builds the control: the same config with seeded random weights.
The library never loops over tokens. Test: `pytest tests/test_validation_predictability.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

from ..adapters import RouterDecision, get_adapter
from ..capture.recorder import RoutingRecorder
from ..errors import InvalidInputError
from ..token_tracker import TokenBatch
from ..var.config import VARConfig
from ..var.evaluate import EvalBatch
from ..var.evidence import collect_evidence
from ..var.tables import VARTables

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

    def __post_init__(self) -> None:
        if self.min_pair_count < 1:
            raise InvalidInputError(f"--min-pair-count must be at least 1, got {self.min_pair_count}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PredictabilityConfig":
        return cls(**json.loads(text))


def true_sets(decision: RouterDecision) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted top-k set_TK, top-1 expert_T = the highest-weight chosen expert)."""
    idx_TK = decision.topk_idx_TK.long()
    top1_T = idx_TK.gather(1, decision.topk_w_TK.float().argmax(dim=1, keepdim=True))[:, 0]
    return torch.sort(idx_TK, dim=1).values, top1_T


def score_sets(pred_TK: torch.Tensor, sets_TK: torch.Tensor, top1_T: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token exact / top1 / overlap of a k-set prediction (both sorted)."""
    k = sets_TK.shape[1]
    member_TK = (pred_TK[:, :, None] == sets_TK[:, None, :]).any(dim=2)
    return {"exact": (pred_TK == sets_TK).all(dim=1).float(),
            "top1": (pred_TK == top1_T[:, None]).any(dim=1).float(),
            "overlap": member_TK.sum(dim=1).float() / k}


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


def score_cache(cache_TE: torch.Tensor, sets_TK: torch.Tensor, top1_T: torch.Tensor) -> dict[str, torch.Tensor]:
    inside_TK = cache_TE.gather(1, sets_TK)
    return {"exact": inside_TK.all(dim=1).float(),
            "top1": cache_TE.gather(1, top1_T[:, None])[:, 0].float(),
            "overlap": inside_TK.float().mean(dim=1)}


class _Scorer:
    """Accumulates metric sums per (layer, predictor) over the test pass."""

    def __init__(self, tables: VARTables, num_experts: int, top_k: int):
        self.tables = {layer: Predictor(tables, layer) for layer in tables.layers}
        self.names = PREDICTORS
        self.num_experts = num_experts
        self.top_k = top_k
        self.sums: dict[tuple[int, str], dict[str, float]] = {}
        self.hits: dict[tuple[int, str], float] = {}
        self.num_tokens = 0

    def _add(self, layer: int, name: str, scores: dict[str, torch.Tensor], hit: torch.Tensor | None = None) -> None:
        acc = self.sums.setdefault((layer, name), {"exact": 0.0, "top1": 0.0, "overlap": 0.0, "n": 0.0})
        for key, v in scores.items():
            acc[key] += float(v.sum())
        acc["n"] += float(next(iter(scores.values())).numel())
        if hit is not None:
            self.hits[(layer, name)] = self.hits.get((layer, name), 0.0) + float(hit.float().sum())

    def __call__(self, layer: int, tokens: TokenBatch, decision: RouterDecision) -> None:
        valid_T = tokens.valid_T.bool()
        sets_TK, top1_T = true_sets(decision)
        tab = self.tables[layer]
        ids_T, prev_T = tokens.ids_T[valid_T].long(), tokens.prev_T[valid_T].long()
        s_TK, t1_T = sets_TK[valid_T], top1_T[valid_T]
        if layer == min(self.tables):
            self.num_tokens += int(valid_T.sum())
        pred, hit = tab.token_predict(ids_T)
        self._add(layer, "token_table", score_sets(pred, s_TK, t1_T), hit)
        pred, hit = tab.pair_predict(prev_T, ids_T)
        self._add(layer, "pair_table", score_sets(pred, s_TK, t1_T), hit)
        self._add(layer, "global_set", score_sets(tab.global_set_K.expand_as(s_TK), s_TK, t1_T))
        b, s, k = tokens.batch_size, tokens.seq_len, self.top_k
        idx_BSK = decision.topk_idx_TK.long().reshape(b, s, k)
        w_BSK = decision.topk_w_TK.reshape(b, s, k)
        for name, size in (("lru_k", k), ("lru_2k", 2 * k)):
            cache_TE = lru_cache_BSE(idx_BSK, w_BSK, tokens.valid_T.bool().reshape(b, s), self.num_experts, size)
            self._add(layer, name, score_cache(cache_TE.reshape(b * s, -1)[valid_T], s_TK, t1_T))

    def rows(self, model_name: str) -> list[dict[str, Any]]:
        out = []
        layers = sorted({layer for layer, _ in self.sums})
        for name in self.names:
            total = {"exact": 0.0, "top1": 0.0, "overlap": 0.0, "n": 0.0}
            hit_total = 0.0
            for layer in layers:
                acc = self.sums[(layer, name)]
                n = max(acc["n"], 1.0)
                row = {"model": model_name, "layer": layer, "predictor": name, "n": int(acc["n"]),
                       **{m: acc[m] / n for m in ("exact", "top1", "overlap")}}
                if (layer, name) in self.hits:
                    row["table_hit"] = self.hits[(layer, name)] / n
                    hit_total += self.hits[(layer, name)]
                out.append(row)
                for m in total:
                    total[m] += acc[m]
            n = max(total["n"], 1.0)
            row = {"model": model_name, "layer": "all", "predictor": name, "n": int(total["n"]),
                   **{m: total[m] / n for m in ("exact", "top1", "overlap")}}
            if name.endswith("_table"):
                row["table_hit"] = hit_total / n
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


def score_predictors(model: Any, tables: VARTables, batches: Iterable, model_name: str) -> tuple[list[dict], int]:
    """Scores every predictor on the test batches (one pass)."""
    adapter = get_adapter(model)
    scorer = _Scorer(tables, adapter.num_experts, adapter.top_k)
    _run(model, batches, scorer)
    return scorer.rows(model_name), scorer.num_tokens


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
            out.setdefault(r["model"], {})[r["predictor"]] = {m: r[m] for m in ("exact", "top1", "overlap")}
    if "trained" in out and "control" in out:
        out["margin_trained_minus_control"] = {
            p: {m: out["trained"][p][m] - out["control"][p][m] for m in ("exact", "top1", "overlap")}
            for p in out["trained"] if p in out["control"]}
    return out


def heldout_predictability(model: Any, calib_batches: list, test_batches: list,
                           config: PredictabilityConfig | None = None, control: str | None = None,
                           info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The held-out report for `model` (and its random-init control when control == "random-init")."""
    config = config or PredictabilityConfig()
    if control not in (None, "none", "random-init"):
        raise InvalidInputError(f"--control must be 'random-init' or 'none', got {control!r}")
    adapter = get_adapter(model)
    tables, n_cal = calibrate(model, calib_batches, config)
    rows, n_test = score_predictors(model, tables, test_batches, "trained")
    if control == "random-init":
        ctrl = random_init_control(model, config.control_seed)
        ctrl_tables, _ = calibrate(ctrl, calib_batches, config)
        ctrl_rows, _ = score_predictors(ctrl, ctrl_tables, test_batches, "control")
        rows += ctrl_rows
        del ctrl
    return {
        **(info or {}),
        "num_experts": adapter.num_experts, "top_k": adapter.top_k,
        "num_tokens_calibration": n_cal, "num_tokens_test": n_test,
        "config": json.loads(config.to_json()), "control": control if control != "none" else None,
        "predictors": list(PREDICTORS),
        "definitions": DEFINITIONS,
        "random_exact_baseline": 1.0 / _comb(adapter.num_experts, adapter.top_k),
        "rows": rows, "summary": _summary(rows),
    }


def _comb(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)
