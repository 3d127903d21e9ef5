"""Routing evidence by document: what the table builder chooses and certifies entries from.

`collect_evidence(model, batches)` runs the model over batches whose rows carry a document id
(`EvalBatch.doc_B`) under a `RoutingRecorder` (the router's own outputs, padding masked) and keeps,
per MoE layer (`LayerEvidence`): distinct (document, previous token, token, set code) rows and their
counts (set code: `capture.router_math.set_codes`), so every per-token and per-(previous, token)
count can be recomputed by document; per half (`half_of`: index parity, 0 = choose, 1 = certify)
and token, occurrences and summed routing entropy (nats); per observed (half, token, expert) cell,
how often the expert was chosen and its summed weight (for the served weights), kept sparsely (the
capture's `HashIndex`) so memory follows what was seen, not V x E. Pending rows are consolidated
past a size bound so memory is O(distinct rows). Evidence and tables save as safetensors with JSON
metadata (`write_artifact` / `read_artifact`, which refuse a missing, foreign or corrupt file the
same way; no pickle), so a sweep can rebuild tables without rerunning the model.
Shapes: T tokens, K top-k, E experts, V vocabulary, R rows. Test: `pytest tests/test_var_tables.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..capture.router_math import binomial_table, set_codes
from ..errors import InvalidInputError

_CONSOLIDATE_ROWS = 2_000_000
SET_CODE = "combinatorial number system id of the sorted set"  # in the metadata; files with another code are refused


def half_of(doc: torch.Tensor) -> torch.Tensor:
    """0 for documents that choose entries, 1 for those that certify them (by index parity)."""
    return doc.remainder(2)


@dataclass
class LayerEvidence:
    vocab: int
    num_experts: int
    top_k: int
    rows_R4: torch.Tensor = None  # (doc, prev (-1 at a sequence start), token, set code)
    counts_R: torch.Tensor = None
    freq_2V: torch.Tensor = None  # per half
    ent_2V: torch.Tensor = None  # summed entropy (nats)
    cell_keys_C: torch.Tensor = None  # (half * V + token) * E + expert, observed cells only
    cell_chosen_C: torch.Tensor = None  # times the expert was in the token's top-k
    cell_wsum_C: torch.Tensor = None  # summed weight of the expert when chosen
    _pending: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from ..capture.hash_index import HashIndex

        if self.rows_R4 is None:  # new, empty evidence (`Evidence.load` passes every tensor)
            self.rows_R4 = torch.zeros(0, 4, dtype=torch.long)
            self.counts_R = torch.zeros(0, dtype=torch.long)
            self.freq_2V = torch.zeros(2, self.vocab, dtype=torch.float64)
            self.ent_2V = torch.zeros(2, self.vocab, dtype=torch.float64)
            self.cell_keys_C = torch.zeros(0, dtype=torch.long)
            self.cell_chosen_C = torch.zeros(0, dtype=torch.float64)
            self.cell_wsum_C = torch.zeros(0, dtype=torch.float64)
        self._cells = HashIndex.build(self.cell_keys_C)

    def add(self, doc_T: torch.Tensor, prev_T: torch.Tensor, ids_T: torch.Tensor, idx_TK: torch.Tensor,
            w_TK: torch.Tensor, probs_TE: torch.Tensor) -> None:
        e = self.num_experts
        doc_T, prev_T, ids_T = doc_T.long().cpu(), prev_T.long().cpu(), ids_T.long().cpu()
        idx_TK, w_TK, probs_TE = idx_TK.long().cpu(), w_TK.double().cpu(), probs_TE.double().cpu()
        code_T = set_codes(idx_TK.sort(1).values, e)
        u, c = torch.unique(torch.stack([doc_T, prev_T, ids_T, code_T], 1), dim=0, return_counts=True)
        self._pending.append((u, c))
        if sum(x.shape[0] for x, _ in self._pending) > _CONSOLIDATE_ROWS:
            self.consolidate()
        flat_T = half_of(doc_T) * self.vocab + ids_T  # index into the flattened (2, V)
        self.freq_2V.view(-1).index_add_(0, flat_T, torch.ones_like(flat_T, dtype=torch.float64))
        ent_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(1)
        self.ent_2V.view(-1).index_add_(0, flat_T, ent_T)
        cell = self._cells.insert((flat_T[:, None] * e + idx_TK).reshape(-1))
        n = len(self._cells)
        if n > self.cell_chosen_C.numel():
            grow = lambda t: torch.cat([t, t.new_zeros(max(n, 2 * t.numel()) - t.numel())])  # noqa: E731
            self.cell_chosen_C, self.cell_wsum_C = grow(self.cell_chosen_C), grow(self.cell_wsum_C)
        self.cell_chosen_C.index_add_(0, cell, torch.ones(cell.numel(), dtype=torch.float64))
        self.cell_wsum_C.index_add_(0, cell, w_TK.reshape(-1))
        self.cell_keys_C = self._cells.keys

    def mean_weights(self, tok_X: torch.Tensor, sets_XK: torch.Tensor, halves: slice) -> torch.Tensor:
        """(X, K) mean weight of expert `sets_XK[x, j]` for token `tok_X[x]` when chosen, over the
        given halves (0 where never chosen): lookups of the observed cells, no V x E array (at
        Kimi-K2's vocabulary and 384 experts one would take 0.5 GB per layer and copy)."""
        e = self.num_experts
        chosen = torch.zeros(sets_XK.shape, dtype=torch.float64)
        wsum = torch.zeros(sets_XK.shape, dtype=torch.float64)
        for half in range(*halves.indices(2)):  # at most 2 halves
            cell = self._cells.lookup((((half * self.vocab + tok_X.long()) * e)[:, None] + sets_XK.long()).reshape(-1))
            hit = cell >= 0
            chosen.view(-1)[hit] += self.cell_chosen_C[cell[hit]]
            wsum.view(-1)[hit] += self.cell_wsum_C[cell[hit]]
        return wsum / chosen.clamp_min(1)

    def consolidate(self) -> None:
        n = len(self._cells)
        self.cell_chosen_C, self.cell_wsum_C = self.cell_chosen_C[:n], self.cell_wsum_C[:n]
        if not self._pending:
            return
        rows = torch.cat([self.rows_R4] + [u for u, _ in self._pending])
        counts = torch.cat([self.counts_R] + [c for _, c in self._pending])
        self.rows_R4, inv = torch.unique(rows, dim=0, return_inverse=True)
        self.counts_R = torch.zeros(self.rows_R4.shape[0], dtype=torch.long).index_add_(0, inv, counts)
        self._pending = []
        self._summary_cache = None  # what certify._summary derived from the rows is stale now

    TENSORS = ("rows_R4", "counts_R", "freq_2V", "ent_2V", "cell_keys_C", "cell_chosen_C", "cell_wsum_C")


def write_artifact(path: str | Path, key: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Save `tensors` as safetensors with `meta` as JSON in the metadata entry `key` (`read_artifact` reads it)."""
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata={key: json.dumps(meta)})
    return Path(path)


def read_artifact(path: str | Path, key: str, what: str,
                  hint: str = "") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of the safetensors file at `path` whose metadata entry `key` holds JSON:
    FileNotFoundError (with `hint`) for a missing file, InvalidInputError for any other."""
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} file {p} does not exist{f' ({hint})' if hint else ''}")
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(key, "null"))
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:
        raise InvalidInputError(f"{p} is not a {what} file ({exc})") from exc
    if not isinstance(meta, dict):
        raise InvalidInputError(f"{p} has no {what} metadata")
    return meta, tensors


@dataclass(eq=False)
class Evidence:
    """Per-layer `LayerEvidence` plus metadata (model identity, documents, tokens, source)."""

    layers: dict[int, LayerEvidence]
    metadata: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        for ev in self.layers.values():
            ev.consolidate()
        tensors = {f"layer{l}.{n}": getattr(ev, n) for l, ev in self.layers.items() for n in LayerEvidence.TENSORS}
        return write_artifact(path, "varmoe_evidence", self.metadata, tensors)

    @classmethod
    def load(cls, path: str | Path) -> "Evidence":
        p = Path(path)
        meta, tensors = read_artifact(p, "varmoe_evidence", "VAR evidence")
        if meta.get("set_code") != SET_CODE:
            raise InvalidInputError(f"{p} encodes top-k sets as {meta.get('set_code')!r}, not {SET_CODE!r}; collect it again")
        v, e, k = meta["vocab_size"], meta["num_experts"], meta["top_k"]
        layers = {}
        for l in meta["layers"]:
            if f"layer{l}.chosen_2VE" in tensors:  # files from before the cells were sparse
                dense = tensors[f"layer{l}.chosen_2VE"].reshape(-1)
                keys = dense.nonzero().squeeze(1)
                tensors |= {f"layer{l}.cell_keys_C": keys, f"layer{l}.cell_chosen_C": dense[keys],
                            f"layer{l}.cell_wsum_C": tensors[f"layer{l}.wsum_2VE"].reshape(-1)[keys]}
            layers[int(l)] = LayerEvidence(v, e, k, *(tensors[f"layer{l}.{n}"] for n in LayerEvidence.TENSORS))
        return cls(layers, meta)


@torch.no_grad()
def collect_evidence(model: Any, batches: Iterable[Any], adapter: Any = None, info: dict[str, Any] | None = None) -> Evidence:
    """One routing pass over batches with document ids (`.ids`, `.mask`, `.doc_B`)."""
    from ..adapters import get_adapter
    from ..capture.recorder import RoutingRecorder

    adapter = adapter or get_adapter(model)
    binomial_table(adapter.num_experts, adapter.top_k)  # refuses shapes whose set codes overflow, before the model runs
    vocab = int(model.config.vocab_size)
    layers: dict[int, LayerEvidence] = {}
    device = next(model.parameters()).device
    current: dict[str, torch.Tensor] = {}
    docs: set[int] = set()

    def cb(layer: int, tokens: Any, decision: Any) -> None:
        v = tokens.valid_T.bool()
        ev = layers.setdefault(layer, LayerEvidence(vocab, adapter.num_experts, adapter.top_k))
        doc_T = current["doc_B"].repeat_interleave(tokens.seq_len)
        ev.add(doc_T[v.cpu()], tokens.prev_T[v], tokens.ids_T[v], decision.topk_idx_TK[v], decision.topk_w_TK[v],
               decision.probs_TE[v])

    n_tokens = 0
    with RoutingRecorder(model, callback=cb, window=1, adapter=adapter):
        for b in batches:
            current["doc_B"] = torch.as_tensor(b.doc_B, dtype=torch.long)
            docs.update(int(d) for d in b.doc_B)
            n_tokens += int(b.mask.sum())
            model(input_ids=b.ids.to(device), attention_mask=b.mask.to(device), use_cache=False)
    if not layers:
        raise InvalidInputError("the calibration pass produced no routing (empty split?)")
    for ev in layers.values():
        ev.consolidate()
    meta = {**(info or {}), "set_code": SET_CODE, "vocab_size": vocab, "num_experts": adapter.num_experts, "top_k": adapter.top_k,
            "layers": sorted(layers), "num_tokens": n_tokens, "num_documents": len(docs),
            "documents_per_half": [sum(1 for d in docs if d % 2 == h) for h in (0, 1)],
            "split_rule": "documents with an even index choose each entry's set, odd ones certify it"}
    return Evidence(layers, meta)
