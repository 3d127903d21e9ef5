"""In-sample (uncertified) VAR tables straight from a statistics frame -- the seed's workflow.

Statistics computed in memory (`RouterAnalyzer(model)`, `analyze_batch(...)`, the vocabulary
analysis saved to Parquet) name no documents, so `tables.py`'s held-out certification cannot run.
Here each token's modal top-k set is entered by the same filters and multiplicity rule as certified
entries, but the score test runs on the *same* occurrences that chose the set. That agreement is
optimistic, so nothing here is certified: the metadata says so (`uncertified`, with the commands
that certify), and so do `print_performance_summary()` and the server's `/var/status`. Token entries
only: (previous, token) entries need evidence by document. `tables_for_stats` (the wrapper's path
from `VARConfig.routing_stats_path`) certifies by document when the statistics name their documents.
Test: `pytest tests/test_var_seed_workflow.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from .certify import Candidates, passes_filters, score_pvalues, served_weights
from .config import VARConfig
from .stats_io import names_documents, read_stats_for_model, read_stats_metadata
from .tables import VARTables, certify_entries, identity_and_layers, table_metadata

CERTIFY_COMMANDS = ("`varmoe capture --split calibration --output calib.parquet` (statistics that name their documents), "
                    "then `varmoe build-tables --routing-stats calib.parquet --output tables.safetensors`")
UNCERTIFIED_NOTE = ("UNCERTIFIED tables: chosen and scored in-sample on statistics without document metadata, so their "
                    "agreement is not held out; certify with " + CERTIFY_COMMANDS)


def _by_token(sub: Any, name: str, v: int, dtype: torch.dtype, width: int | None = None,
               per_expert: bool = False) -> torch.Tensor:
    """A column of one layer's rows scattered over the vocabulary (zeros for unseen tokens): (V,) for
    a number per row, (V, width) for a list. A `per_expert` list is sparse, aligned with
    `expert_ids` (the statistics schema), or holds one entry per expert (frames of schema version 1)."""
    out = torch.zeros(v if width is None else (v, width), dtype=dtype)
    if not len(sub):
        return out
    if width is None:
        rows = sub[name].to_numpy()
    elif per_expert and "expert_ids" in sub.columns:
        from ..capture.schema import densify_experts

        rows = densify_experts(sub, name, width)
    else:
        rows = np.stack([np.asarray(x, dtype=np.float64) for x in sub[name]])
        if rows.shape[1] != width:
            raise InvalidInputError(f"statistics column {name!r} has {rows.shape[1]} entries per row, the model "
                                    f"needs {width}")
    out[torch.tensor(sub["token_id"].to_numpy(), dtype=torch.long)] = torch.tensor(rows, dtype=dtype)
    return out


def layer_candidates_in_sample(sub: Any, config: VARConfig, vocab: int, num_experts: int, top_k: int) -> Candidates:
    """One layer's candidates from its (layer, token) rows: set, filters and agreement all in-sample."""
    ids_V = torch.tensor(sub["token_id"].to_numpy(), dtype=torch.long)
    if len(sub) and (int(ids_V.min()) < 0 or int(ids_V.max()) >= vocab):
        raise InvalidInputError(f"statistics hold token ids outside the model's vocabulary of {vocab}")
    freq_V, agree_V, ent_V = (_by_token(sub, name, vocab, torch.float64)
                              for name in ("frequency", "modal_set_count", "mean_entropy"))
    modal_VK = _by_token(sub, "modal_topk_set", vocab, torch.long, top_k)
    chosen_VE = _by_token(sub, "topk_counts", vocab, torch.float64, num_experts, per_expert=True)
    wsum_VE = _by_token(sub, "topk_weight_sums", vocab, torch.float64, num_experts, per_expert=True)
    seen_V = freq_V > 0
    eligible_V = passes_filters(seen_V, freq_V, ent_V, config, num_experts)
    modal_VK, w_VK, mass_V = served_weights((wsum_VE / chosen_VE.clamp_min(1)).gather(1, modal_VK), modal_VK, seen_V)
    pvals_V = score_pvalues(agree_V, freq_V, config.target_agreement)
    return Candidates(modal_VK, eligible_V, agree_V, freq_V, seen_V.double(), w_VK, mass_V, pvals_V, freq_V)


def tables_for_stats(path: str | Path, model: Any, adapter: Any, config: VARConfig, layers: list[int] | None = None,
                     allow_test_split: bool = False) -> VARTables:
    """Tables from a statistics file: certified by document (`VARTables.from_stats_file`) when its
    metadata names its documents, else in-sample and uncertified."""
    if names_documents(read_stats_metadata(path)):  # the key-value metadata only: the frame is read once
        return VARTables.from_stats_file(path, model, adapter, config, layers=layers, allow_test_split=allow_test_split)
    df, meta = read_stats_for_model(path, model, adapter, allow_test_split)
    ident, layers = identity_and_layers(model, adapter, layers)
    missing = sorted(set(layers) - set(int(x) for x in df["layer"].unique()))
    if missing:
        raise InvalidInputError(f"statistics {path} have no rows for MoE layer(s) {missing}")
    cands = {l: layer_candidates_in_sample(df[df["layer"] == l], config, ident["vocab_size"], ident["num_experts"],
                                           ident["top_k"]) for l in layers}
    tabs, _, info = certify_entries(cands, {}, config, "in-sample: sets chosen and scored on the same statistics "
                                                      "(no document metadata); not certified")
    return VARTables(tabs, {**table_metadata(ident, layers, config, str(path), meta, info), "certified": False,
                            "uncertified": UNCERTIFIED_NOTE})
