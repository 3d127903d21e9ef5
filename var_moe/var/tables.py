"""Verified routing tables: built from routing evidence, saved, loaded and checked against a model.

Per layer, each token's set is chosen on some documents and its agreement certified on others (the
`choose` modes and the statistics are in `certify.py`). Entries are accepted by a one-sided Wilson
score test of "agreement <= target_agreement" over ALL token and (with `config.pair_entries`,
`pairs.py`) (previous, token) candidates of all layers as one family (`certify_entries`); `bound_V`
is each entry's Wilson lower bound at its adjusted level. The assumption left: documents are
independent draws of the text the tables will serve. Evidence (`evidence.py`) comes from a routing
pass over the documents a capture's metadata names (`from_stats_file` checks it reproduces the
capture's token counts), the choosing side optionally from another split (`evidence_for_split`).
Test-split evidence is refused on either side (unless allowed), and so is a choosing evidence from
the certifying one's split; the metadata records both sides (`choosing`, `certifying`).
Files: safetensors (`layer{l}.{name}`) + the metadata as JSON beside it; `VARTables.load(path,
model)` refuses a file made for another model type, vocabulary, E, k or router weights.
Test: `pytest tests/test_var_tables.py tests/test_var_verification.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from ..identity import model_dir_of, routers_fingerprint
from .certify import Candidates, global_set, layer_candidates, multiplicity_levels, pair_table, wilson_lower_bound
from .config import VARConfig
from .evidence import Evidence, collect_evidence, read_artifact, write_artifact
from .pairs import PairCandidates, PairTable, pair_candidates
from .served import pair_serves, split_key
from .stats_io import check_split, model_shape, read_stats_for_model, stats_documents

FORMAT_VERSION = 2
PAIR_NAMES = tuple(f.name for f in fields(PairTable))
CHECK_PAIR_NAMES = ("pair_keys_P", "pair_sets_PK", "pair_counts_P")  # VARTables.pairs, for validation


@dataclass
class LayerTable:
    """One layer's token entries: the chosen set and weights per token, which tokens are entries
    (`member_V`) with their bounds, and the certifying counts that shadow verification extends."""

    experts_VK: torch.Tensor  # long
    weights_VK: torch.Tensor  # float32, rows sum to 1 over the set
    mass_V: torch.Tensor  # float32, raw sum of mean learned weights over the set
    member_V: torch.Tensor  # bool
    bound_V: torch.Tensor  # float32 Wilson lower bound (0 for tokens never seen)
    agree_V: torch.Tensor  # float64 calibration occurrences with the modal set
    total_V: torch.Tensor  # float64 calibration occurrences
    select_V: torch.Tensor  # float64 occurrences on the choosing side (0 = token unseen there)

    @classmethod
    def empty(cls, vocab: int, k: int) -> "LayerTable":
        return cls(torch.zeros(vocab, k, dtype=torch.long), torch.full((vocab, k), 1.0 / k), torch.ones(vocab),
                   torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab), torch.zeros(vocab, dtype=torch.float64),
                   torch.zeros(vocab, dtype=torch.float64), torch.zeros(vocab, dtype=torch.float64))

    @property
    def size(self) -> int:
        return int(self.member_V.sum())


TABLE_NAMES = tuple(f.name for f in fields(LayerTable))  # a tables file's tensors per layer, in field order


def certify_entries(cands: dict[int, Candidates], pair_cands: dict[int, PairCandidates], config: VARConfig,
                    method: str = "choose on even documents, certify on odd documents",
                    ) -> tuple[dict[int, LayerTable], dict[int, PairTable], dict[str, Any]]:
    """The multiplicity step over every token candidate AND every (previous, token) candidate
    (`pairs.py`) of every layer as one family, then token tables and pair tables."""
    alpha = (1 - config.confidence_level) / 2  # one-sided; for m = 1 the two-sided Wilson interval at confidence_level
    layers = sorted(cands)
    players = sorted(pair_cands)
    pv = torch.cat([cands[l].pvalue_V[cands[l].eligible_V] for l in layers]
                   + [pair_cands[l].pvalue_P[pair_cands[l].eligible_P] for l in players])
    accepted, level = multiplicity_levels(pv, alpha, config.multiplicity)
    start = 0

    def split(eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(member, z) of one block of the family, in the block's own index space."""
        nonlocal start
        idx = eligible.nonzero().squeeze(1)
        n = idx.numel()
        member = torch.zeros_like(eligible)
        member[idx] = accepted[start:start + n]
        level_X = torch.full(eligible.shape, alpha, dtype=torch.float64)
        level_X[idx] = level[start:start + n]
        start += n
        return member, torch.special.ndtri(1 - level_X.clamp(1e-300, 0.5))

    out: dict[int, LayerTable] = {}
    for l in layers:
        c = cands[l]
        member_V, z_V = split(c.eligible_V)
        bound_V = wilson_lower_bound(c.agree_V, c.total_V, z_V)
        out[l] = LayerTable(c.modal_VK, c.weights_VK.float(), c.mass_V.float(), member_V, bound_V.float(),
                            c.agree_V, c.total_V, c.select_V)
    n_tok = start  # the token candidates come first in the family
    info = {"method": method, "multiplicity": config.multiplicity,
            "alpha_one_sided": alpha, "candidates": n_tok, "accepted": int(accepted[:n_tok].sum()),
            "max_per_document": config.max_per_document}
    ptabs: dict[int, PairTable] = {}
    for l in players:
        c = pair_cands[l]
        m, z_P = split(c.eligible_P)
        ptabs[l] = PairTable(c.keys_P[m], c.sets_PK[m], c.weights_PK[m].float(), c.mass_P[m].float(), c.code_P[m],
                             wilson_lower_bound(c.agree_P, c.total_P, z_P)[m].float(), c.agree_P[m], c.total_P[m])
    if players:
        info |= {"pair_candidates": int(pv.numel()) - n_tok, "pair_accepted": int(accepted[n_tok:].sum()),
                 "family": "token and (previous, token) candidates of all layers"}
    return out, ptabs, info


def _collect(model: Any, adapter: Any, batches: list[Any], info: dict[str, Any]) -> Evidence:
    """Evidence over `batches`, its metadata naming the routers it was collected with."""
    if not batches:
        raise InvalidInputError("no text to collect routing evidence from")
    fingerprint = model_identity(model, adapter)["router_fingerprint"]
    return collect_evidence(model, batches, adapter, {**info, "router_fingerprint": fingerprint})


def spread_indices(n: int, max_docs: int | None) -> list[int]:
    """At most `max_docs` of n document indices, evenly spread over the split (its order follows
    the folder tree, so the first documents would all come from a few packages)."""
    if max_docs is not None and max_docs < 1:
        raise InvalidInputError("--choose-max-docs must be >= 1")
    if max_docs is None or max_docs >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, max_docs).round()})


def evidence_for_split(model: Any, adapter: Any, tokenizer: Any, dataset: str, split: str, max_length: int,
                       max_docs: int | None = None, batch_size: int = 8) -> Evidence:
    """Evidence over whole documents of one split (every piece), at most `max_docs` of them spread
    evenly; e.g. training-split documents that choose entries certified on the calibration split."""
    from ..corpus import encode_document, iter_documents
    from .eval_data import document_batches

    docs = list(iter_documents(dataset, split))
    keep = spread_indices(len(docs), max_docs)
    batches = document_batches(tokenizer, ((d, encode_document(tokenizer, docs[d].text)) for d in keep), max_length,
                               batch_size)
    return _collect(model, adapter, batches, {
        "model": str(getattr(model.config, "_name_or_path", "")), "dataset": dataset, "split": split,
        "max_length": int(max_length), "split_documents": len(docs),
        "document_rule": f"{len(keep)} of the split's {len(docs)} documents, evenly spread"})


def evidence_for_stats(meta: dict[str, Any], model: Any, adapter: Any, tokenizer: Any = None,
                       batch_size: int = 8) -> Evidence:
    """Collect evidence over the documents a capture's metadata names (dataset, split, max_length,
    num_samples), keeping every piece of every document (as the capture did)."""
    from .eval_data import eval_batches

    dataset, split, max_length, num_samples = stats_documents(meta)
    if tokenizer is None:
        from transformers import AutoTokenizer

        name = meta.get("model") or (meta.get("config") or {}).get("model")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # a missing or foreign tokenizer folder
            raise InvalidInputError(f"cannot load the tokenizer of {name!r} named by the statistics ({exc})") from exc
    batches = eval_batches(tokenizer, dataset, split, num_samples, max_length, batch_size, max_per_doc=None)
    return _collect(model, adapter, batches, {"model": meta.get("model"), "dataset": dataset, "split": split,
                                              "max_length": max_length})


def frequency_check(df: Any, evidence: Evidence) -> dict[str, Any]:
    """How far the evidence pass's token counts are from the capture's (0 = the same documents)."""
    worst = 0.0
    for l, ev in evidence.layers.items():
        sub = df[df["layer"] == l]
        freq_V = (ev.freq_2V[0] + ev.freq_2V[1]).numpy()
        want = np.zeros_like(freq_V)
        want[sub["token_id"].to_numpy()] = sub["frequency"].to_numpy()
        worst = max(worst, float(np.abs(freq_V - want).sum() / max(want.sum(), 1)))
    return {"relative_l1_difference": worst, "same_tokens": worst == 0.0}


def model_identity(model: Any, adapter: Any) -> dict[str, Any]:
    layers = adapter.moe_layers(model)
    loaded = {m.layer: dict(getattr(m.block, m.router_attr).state_dict()) for m in layers}
    return {
        "model": str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")),
        **model_shape(model, adapter),
        # the stored checkpoint's routers when these are they (any loaded dtype), else these bytes
        "router_fingerprint": routers_fingerprint(loaded, model_dir_of(model)),
        # the dtype routing is computed in here: a server in another dtype re-measures (served_dtype.py)
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _check_evidence(evidence: Evidence, ident: dict[str, Any], layers: list[int], source: str, allow_test: bool) -> None:
    """Evidence must fit the model (shape, router weights), cover the layers, and not be test data."""
    for key in ("vocab_size", "num_experts", "top_k"):
        if evidence.metadata.get(key) != ident[key]:
            raise InvalidInputError(f"evidence {source} was collected for {key}={evidence.metadata.get(key)!r}, "
                                    f"the model has {key}={ident[key]!r}")
    fp = evidence.metadata.get("router_fingerprint")
    if fp is not None and fp != ident["router_fingerprint"]:
        raise InvalidInputError(f"evidence {source} was collected with other router weights; collect it again for this model")
    missing = sorted(set(layers) - set(evidence.layers))
    if missing:
        raise InvalidInputError(f"evidence {source} has no routing for layers {missing}")
    check_split(evidence.metadata, f"evidence {source}", allow_test)


def _check_held_out(choosing: dict[str, Any], certifying: dict[str, Any], choose_source: str, source: str) -> None:
    """A separate choosing evidence must come from other documents than the certifying one."""
    split_c, split_v = choosing.get("split"), certifying.get("split")
    if split_c is None or split_v is None:
        raise InvalidInputError(f"choosing evidence {choose_source} and certifying evidence {source} must both name their "
                                "split, so that they can be told apart (collect them with `varmoe build-tables`)")
    if (choosing.get("dataset"), split_c) == (certifying.get("dataset"), split_v):
        raise InvalidInputError(f"choosing evidence {choose_source} and certifying evidence {source} both come from split "
                                f"{split_c!r} of {choosing.get('dataset')!r}: certification would not be held out; choose "
                                "on another split (e.g. --choose-split train) or drop the choosing evidence")


def _sides(evidence: Evidence, source: str, chooser: Evidence | None, choose_source: str, choose: str) -> dict[str, Any]:
    """Where the tables' sets were chosen and where they were certified (for the metadata)."""
    def side(ev: Evidence, src: str, rule: str, counts: tuple[Any, Any] | None = None) -> dict[str, Any]:
        """One side; `counts` = (documents, tokens), default the whole evidence's."""
        m = ev.metadata
        documents, tokens = counts or (m.get("num_documents"), m.get("num_tokens"))
        return {"source": str(src), "dataset": m.get("dataset"), "split": m.get("split"), "documents": documents,
                "tokens": tokens, "documents_rule": rule}

    if choose == "all":
        return {"choosing": side(evidence, source, "all documents"),
                "certifying": side(evidence, source, "none (nothing certified)", (0, 0))}
    if chooser is None:
        halves = evidence.metadata.get("documents_per_half") or [None, None]
        first = evidence.layers[min(evidence.layers)]
        tokens = [int(first.freq_2V[h].sum()) for h in (0, 1)]  # every valid token is routed once per layer
        return {"choosing": side(evidence, source, "even-indexed documents", (halves[0], tokens[0])),
                "certifying": side(evidence, source, "odd-indexed documents", (halves[1], tokens[1]))}
    rule = "all documents of the {} evidence ({})"
    return {"choosing": side(chooser, choose_source, rule.format("choosing", chooser.metadata.get("split"))),
            "certifying": side(evidence, source, rule.format("certifying", evidence.metadata.get("split")))}


def identity_and_layers(model: Any, adapter: Any, layers: list[int] | None) -> tuple[dict[str, Any], list[int]]:
    """The model's identity and the layers to build tables for (default: every MoE layer)."""
    moe = [m.layer for m in adapter.moe_layers(model)]
    return model_identity(model, adapter), layers if layers is not None else moe


def table_metadata(ident: dict[str, Any], layers: list[int], config: VARConfig, source: str,
                   source_meta: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """What every tables file records: the model, its layers, the config, the source and how it was verified."""
    return {**ident, "layers": layers, "config": config.to_dict(), "source": str(source),
            "source_split": source_meta.get("split"), "source_model": source_meta.get("model"),
            "source_tokens": source_meta.get("num_tokens"), "verification": info, "format_version": FORMAT_VERSION}


@dataclass(eq=False)
class VARTables:
    """Per-layer verified tables plus metadata (model identity, config, source statistics)."""

    layers: dict[int, LayerTable]
    metadata: dict[str, Any]
    # validation only: layer -> (keys_P = prev * V + token, sets_PK, counts_P); layer -> its most frequent set
    # (the fallback predictor)
    pairs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    global_sets: dict[int, torch.Tensor] = field(default_factory=dict)
    pair_tier: dict[int, PairTable] = field(default_factory=dict)  # layer -> certified (previous, token) entries served

    def pair_sizes(self) -> dict[int, int]:
        return {l: p.size for l, p in sorted(self.pair_tier.items())}

    def __getitem__(self, layer: int) -> LayerTable:
        return self.layers[layer]

    def uncertified_note(self) -> str | None:
        """What to tell a user of tables that were not certified on held-out documents (else None)."""
        return self.metadata.get("uncertified")

    def sizes(self) -> dict[int, int]:
        return {l: t.size for l, t in sorted(self.layers.items())}

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def empty(cls, model: Any, adapter: Any, layers: list[int] | None = None) -> "VARTables":
        ident, layers = identity_and_layers(model, adapter, layers)
        tabs = {l: LayerTable.empty(ident["vocab_size"], ident["top_k"]) for l in layers}
        return cls(tabs, {**ident, "layers": layers, "config": None, "source": "empty"})

    @classmethod
    def from_evidence(cls, evidence: Evidence, model: Any, adapter: Any, config: VARConfig,
                      layers: list[int] | None = None, source: str = "", min_pair_count: int = 2,
                      choose: str = "even", choose_evidence: Evidence | None = None, choose_source: str = "",
                      allow_test_split: bool = False) -> "VARTables":
        """Tables for `model` from `evidence` (and `choose_evidence`, if any), as the module docstring says."""
        ident, layers = identity_and_layers(model, adapter, layers)
        allow = allow_test_split or config.allow_test_split
        _check_evidence(evidence, ident, layers, source, allow)
        if choose_evidence is not None:
            if choose not in ("even", "separate"):
                raise InvalidInputError(f"a separate choosing evidence cannot be combined with choose={choose!r}")
            choose = "separate"
            _check_evidence(choose_evidence, ident, layers, choose_source, allow)
            _check_held_out(choose_evidence.metadata, evidence.metadata, choose_source, source)
        elif choose not in ("even", "all"):
            raise InvalidInputError(f"choose must be 'even' or 'all' without a choosing evidence, got {choose!r}")
        chooser = {l: (choose_evidence.layers[l] if choose_evidence is not None else None) for l in layers}
        cands = {l: layer_candidates(evidence.layers[l], config, choose, chooser[l]) for l in layers}
        sides = _sides(evidence, source, choose_evidence, choose_source, choose)
        pcands = {}
        if config.pair_entries and choose != "all":  # candidates pre-screened on the choosing side (pairs.py)
            pcands = {l: pair_candidates(evidence.layers[l], config, config.min_pair_count, True, choose, chooser[l])
                      for l in layers}
        tabs, served_pairs, info = certify_entries(cands, pcands, config, f"choose on {sides['choosing']['documents_rule']}, "
                                                                          f"certify on {sides['certifying']['documents_rule']}")
        if pcands:
            info["pair_entries_without_token_entry"] = {  # the entries that can serve (served.pair_serves)
                str(l): int(pair_serves(tabs[l].member_V[split_key(p.keys_P, tabs[l].member_V.numel())[2]], True).sum())
                for l, p in served_pairs.items()}
        if choose == "all":
            info = {"method": "sets chosen on all calibration documents; nothing certified (Phase 1 predictors)"}
        pairs = {l: pair_table(evidence.layers[l], min_pair_count, choose, chooser[l]) for l in layers}
        glob = {l: global_set(evidence.layers[l], choose, chooser[l]) for l in layers}
        meta = {**table_metadata(ident, layers, config, source, evidence.metadata, info), **sides,
                "source_documents": evidence.metadata.get("documents_per_half"), "min_pair_count": min_pair_count}
        return cls(tabs, meta, pairs, glob, served_pairs)

    @classmethod
    def from_texts(cls, model: Any, tokenizer: Any, texts: list[str], config: VARConfig, max_length: int = 256,
                   batch_size: int = 8, source: str = "texts") -> "VARTables":
        """Tables from a list of documents (each text one document; even ones choose, odd ones
        certify) -- for callers without a capture, e.g. tests that build tables for a tiny model."""
        from ..adapters import get_adapter
        from .eval_data import document_batches

        adapter = get_adapter(model)
        docs = ((d, tokenizer(text, add_special_tokens=False)["input_ids"]) for d, text in enumerate(texts))
        batches = document_batches(tokenizer, docs, max_length, batch_size)
        evidence = _collect(model, adapter, batches, {"source": source})
        return cls.from_evidence(evidence, model, adapter, config, source=source)

    @classmethod
    def from_stats_file(cls, path: str | Path, model: Any, adapter: Any, config: VARConfig,
                        layers: list[int] | None = None, tokenizer: Any = None, evidence: Evidence | None = None,
                        allow_test_split: bool = False, choose_evidence: Evidence | None = None,
                        choose_source: str = "") -> "VARTables":
        """Tables from a calibration capture: a routing pass over the documents its metadata names
        collects the evidence (unless `evidence` is given); `frequency_check` compares its token counts."""
        df, meta = read_stats_for_model(path, model, adapter, allow_test_split)
        if evidence is None:
            evidence = evidence_for_stats(meta, model, adapter, tokenizer)
        tables = cls.from_evidence(evidence, model, adapter, config, layers, source=str(path),
                                   choose_evidence=choose_evidence, choose_source=choose_source,
                                   allow_test_split=allow_test_split)
        tables.metadata["frequency_check"] = frequency_check(df, evidence)
        tables.metadata["source_split"] = meta.get("split")
        return tables

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        tensors = {f"layer{l}.{n}": getattr(t, n) for l, t in self.layers.items() for n in TABLE_NAMES}
        tensors |= {f"layer{l}.{n}": t for l, p in self.pairs.items() for n, t in zip(CHECK_PAIR_NAMES, p)}
        tensors |= {f"layer{l}.global_set_K": g for l, g in self.global_sets.items()}
        tensors |= {f"layer{l}.tier_pair.{n}": getattr(p, n) for l, p in self.pair_tier.items() for n in PAIR_NAMES}
        meta = {**self.metadata, "sizes": {str(l): s for l, s in self.sizes().items()}, "format_version": FORMAT_VERSION}
        if self.pair_tier:
            meta["pair_sizes"] = {str(l): s for l, s in self.pair_sizes().items()}
        p = write_artifact(path, "varmoe_tables", meta, tensors)
        p.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path, model: Any = None, adapter: Any = None, check_fingerprint: bool = True) -> "VARTables":
        p = Path(path)
        meta, tensors = read_artifact(p, "varmoe_tables", "VAR tables", "build it with `varmoe build-tables`")
        layer_ids = meta.get("layers")
        if isinstance(layer_ids, list):
            need = [f"layer{l}.{n}" for l in layer_ids for n in TABLE_NAMES if n != "select_V"]
            missing = [name for name in need if name not in tensors]
        else:
            missing = ["layers"]
        if missing:  # a cut-short or hand-edited file: say what is missing, not a KeyError
            more = " ..." if len(missing) > 3 else ""
            raise InvalidInputError(f"VAR tables {p} lack {', '.join(missing[:3])}{more}; "
                                    "build them again with `varmoe build-tables`")
        for l in layer_ids:  # files of format 1 did not store select_V
            tensors.setdefault(f"layer{l}.select_V", torch.zeros_like(tensors[f"layer{l}.total_V"]))
        layers = {int(l): LayerTable(*(tensors[f"layer{l}.{n}"] for n in TABLE_NAMES)) for l in layer_ids}
        pairs = {int(l): tuple(tensors[f"layer{l}.{n}"] for n in CHECK_PAIR_NAMES)
                 for l in layer_ids if f"layer{l}.pair_keys_P" in tensors}
        glob = {int(l): tensors[f"layer{l}.global_set_K"] for l in layer_ids if f"layer{l}.global_set_K" in tensors}
        tier = {int(l): PairTable(*(tensors[f"layer{l}.tier_pair.{n}"] for n in PAIR_NAMES))
                for l in layer_ids if f"layer{l}.tier_pair.keys_P" in tensors}
        tables = cls(layers, meta, pairs, glob, tier)
        if model is not None:
            tables.check_model(model, adapter, check_fingerprint=check_fingerprint, source=str(p))
        return tables

    def check_identity(self, ident: dict[str, Any], check_fingerprint: bool, source: str, holder: str) -> None:
        """Refuse tables built for another model type, vocabulary, expert count, top-k or (with
        `check_fingerprint`) other router weights than `ident`'s (`holder` names it in the error)."""
        keys = ["model_type", "vocab_size", "num_experts", "top_k"] + (["router_fingerprint"] if check_fingerprint else [])
        for key in keys:
            if self.metadata.get(key) != ident[key]:
                raise InvalidInputError(
                    f"VAR tables {source} were built for {key}={self.metadata.get(key)!r} (model "
                    f"{self.metadata.get('model')!r}) but {holder} has {key}={ident[key]!r}; rebuild them "
                    "with `varmoe build-tables` for these weights")

    def check_model(self, model: Any, adapter: Any = None, check_fingerprint: bool = True, source: str = "tables") -> None:
        from ..adapters import get_adapter

        adapter = adapter or get_adapter(model)
        self.check_identity(model_identity(model, adapter), check_fingerprint, source, "this model")
        moe = {m.layer for m in adapter.moe_layers(model)}
        extra = sorted(set(self.layers) - moe)
        if extra:
            raise InvalidInputError(f"VAR tables {source} have layers {extra} that are not MoE layers of this model ({sorted(moe)})")
