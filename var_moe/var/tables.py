"""Verified routing tables: per layer, which tokens may skip the learned router, and how to route them.

A token enters layer l's table only when, in the calibration statistics of layer l,
- frequency >= `frequency_threshold`,
- mean routing entropy <= `entropy_threshold` (nats, or a share of ln E: `entropy_relative`), and
- the Wilson lower bound (at `confidence_level`) of its agreement rate -- the share of its
  occurrences whose top-k set equals its modal top-k set exactly (`modal_set_count / frequency`) --
  is >= `target_agreement`.
So each entry carries a stated, checked agreement level (`bound_V`). Stored per layer:
`experts_VK` (modal set, ordered by weight, top expert first), `weights_VK` (mean learned weight of
each expert when chosen, renormalised over the set to sum 1), `mass_V` (the raw sum of those mean
weights, for routers that do not normalise), `member_V`, `bound_V`, and the calibration counts
`agree_V` / `total_V` that shadow verification extends.

Files: safetensors (tensors `layer{l}.{name}`) + the same metadata as JSON next to it
(`tables.json`). `VARTables.load(path, model)` refuses a file made for another model type,
vocabulary, expert count, top-k or router weights (fingerprint). Test: `pytest tests/test_var_tables.py`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from .config import VARConfig

FORMAT_VERSION = 1


def wilson_lower_bound(successes: torch.Tensor, trials: torch.Tensor, z: float) -> torch.Tensor:
    """Lower end of the Wilson score interval for a binomial proportion (0 where trials == 0)."""
    n = trials.double()
    p = successes.double() / n.clamp_min(1)
    z2 = z * z
    centre = p + z2 / (2 * n.clamp_min(1))
    spread = z * torch.sqrt(p * (1 - p) / n.clamp_min(1) + z2 / (4 * n.clamp_min(1) ** 2))
    lower = (centre - spread) / (1 + z2 / n.clamp_min(1))
    return torch.where(n > 0, lower.clamp(0, 1), torch.zeros_like(lower))


def wilson_upper_bound(successes: torch.Tensor, trials: torch.Tensor, z: float) -> torch.Tensor:
    """Upper end of the Wilson score interval (1 where trials == 0): the interval is symmetric
    under p -> 1 - p, so it is one minus the lower end for the failures."""
    return 1 - wilson_lower_bound(trials - successes, trials, z)


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
        checks before the running bound drops (measured: 4 demotions at 75% served agreement).
    """
    combined = running_bound < target
    if min_checks <= 0:
        return combined
    served = (shadow_total >= min_checks) & (wilson_upper_bound(shadow_agree, shadow_total, z) < target)
    return combined | served


@dataclass
class LayerTable:
    experts_VK: torch.Tensor  # long
    weights_VK: torch.Tensor  # float32, rows sum to 1 over the set
    mass_V: torch.Tensor  # float32, raw sum of mean learned weights over the set
    member_V: torch.Tensor  # bool
    bound_V: torch.Tensor  # float32 Wilson lower bound (0 for tokens never seen)
    agree_V: torch.Tensor  # float64 calibration occurrences with the modal set
    total_V: torch.Tensor  # float64 calibration occurrences

    NAMES = ("experts_VK", "weights_VK", "mass_V", "member_V", "bound_V", "agree_V", "total_V")

    @classmethod
    def empty(cls, vocab: int, k: int) -> "LayerTable":
        return cls(torch.zeros(vocab, k, dtype=torch.long), torch.full((vocab, k), 1.0 / k), torch.ones(vocab),
                   torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab), torch.zeros(vocab, dtype=torch.float64),
                   torch.zeros(vocab, dtype=torch.float64))

    @property
    def size(self) -> int:
        return int(self.member_V.sum())


def _stack(series: Any, width: int, name: str) -> np.ndarray:
    """A list column (one list per row) as an (N, width) array, checked."""
    arr = np.asarray(series.tolist())
    if arr.ndim != 2 or arr.shape[1] != width:
        raise InvalidInputError(f"statistics column {name!r} must hold lists of length {width}, got shape {arr.shape}")
    return arr


def build_layer_table(df_layer: Any, vocab: int, num_experts: int, k: int, config: VARConfig) -> LayerTable:
    """One layer's table from its rows of the statistics DataFrame (vectorised over rows)."""
    table = LayerTable.empty(vocab, k)
    if len(df_layer) == 0:
        return table
    tok = torch.as_tensor(df_layer["token_id"].to_numpy().copy(), dtype=torch.long)
    if int(tok.max()) >= vocab or int(tok.min()) < 0:
        raise InvalidInputError(f"statistics hold token ids outside the model vocabulary [0, {vocab})")
    freq = torch.as_tensor(df_layer["frequency"].to_numpy().copy(), dtype=torch.float64)
    agree = torch.as_tensor(df_layer["modal_set_count"].to_numpy().copy(), dtype=torch.float64)
    entropy = torch.as_tensor(df_layer["mean_entropy"].to_numpy().copy(), dtype=torch.float64)
    modal_NK = torch.as_tensor(_stack(df_layer["modal_topk_set"], k, "modal_topk_set"), dtype=torch.long)
    counts_NE = torch.as_tensor(_stack(df_layer["topk_counts"], num_experts, "topk_counts"), dtype=torch.float64)
    wsums_NE = torch.as_tensor(_stack(df_layer["topk_weight_sums"], num_experts, "topk_weight_sums"), dtype=torch.float64)
    if bool((agree > freq).any()):
        raise InvalidInputError("statistics have modal_set_count > frequency; the file is corrupt")

    bound_N = wilson_lower_bound(agree, freq, config.wilson_z)
    member_N = (freq >= config.frequency_threshold) & (entropy <= config.entropy_limit_nats(num_experts)) & (bound_N >= config.target_agreement)
    mean_w_NE = wsums_NE / counts_NE.clamp_min(1)
    w_NK = mean_w_NE.gather(1, modal_NK.clamp(0, num_experts - 1))
    mass_N = w_NK.sum(1)
    w_NK = w_NK / mass_N.clamp_min(1e-12)[:, None]
    # slot 0 = the expert with the largest stored weight (adaptive k keeps that one)
    w_NK, order = w_NK.sort(dim=1, descending=True)
    modal_NK = modal_NK.gather(1, order)

    table.experts_VK[tok] = modal_NK
    table.weights_VK[tok] = w_NK.float()
    table.mass_V[tok] = mass_N.float()
    table.member_V[tok] = member_N
    table.bound_V[tok] = bound_N.float()
    table.agree_V[tok] = agree
    table.total_V[tok] = freq
    return table


def router_fingerprint(routers: list[torch.nn.Module]) -> str:
    """SHA-256 (first 16 hex) of the routers' parameters: ties a table to the weights it was verified on."""
    h = hashlib.sha256()
    for r in routers:
        for name, t in sorted(r.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(model: Any, adapter: Any) -> dict[str, Any]:
    layers = adapter.moe_layers(model)
    return {
        "model": str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")),
        "model_type": getattr(model.config, "model_type", None),
        "vocab_size": int(model.config.vocab_size),
        "num_experts": adapter.num_experts,
        "top_k": adapter.top_k,
        "router_fingerprint": router_fingerprint([getattr(m.block, m.router_attr) for m in layers]),
    }


class VARTables:
    """Per-layer verified tables plus metadata (model identity, config, source statistics)."""

    def __init__(self, layers: dict[int, LayerTable], metadata: dict[str, Any]):
        self.layers = layers
        self.metadata = metadata

    def __getitem__(self, layer: int) -> LayerTable:
        return self.layers[layer]

    def sizes(self) -> dict[int, int]:
        return {l: t.size for l, t in sorted(self.layers.items())}

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def empty(cls, model: Any, adapter: Any, layers: list[int] | None = None) -> "VARTables":
        ident = model_identity(model, adapter)
        layers = layers if layers is not None else [m.layer for m in adapter.moe_layers(model)]
        tabs = {l: LayerTable.empty(ident["vocab_size"], ident["top_k"]) for l in layers}
        return cls(tabs, {**ident, "layers": layers, "config": None, "source": "empty"})

    @classmethod
    def from_stats(cls, df: Any, stats_meta: dict[str, Any], model: Any, adapter: Any, config: VARConfig,
                   layers: list[int] | None = None, source: str = "") -> "VARTables":
        """Tables for `model` from a statistics DataFrame (one table per MoE layer present)."""
        from .stats_io import check_stats_for_model

        check_stats_for_model(stats_meta, model, adapter, source=f"statistics {source}".strip())
        split = stats_meta.get("split")
        ident = model_identity(model, adapter)
        moe = [m.layer for m in adapter.moe_layers(model)]
        layers = layers if layers is not None else moe
        vocab, k, e = ident["vocab_size"], ident["top_k"], ident["num_experts"]
        layer_col = df["layer"].to_numpy()
        tabs = {l: build_layer_table(df[layer_col == l], vocab, e, k, config) for l in layers}
        meta = {**ident, "layers": layers, "config": config.to_dict(), "source": str(source),
                "source_split": split, "source_model": stats_meta.get("model"),
                "source_tokens": stats_meta.get("num_tokens"), "format_version": FORMAT_VERSION}
        return cls(tabs, meta)

    @classmethod
    def from_stats_file(cls, path: str | Path, model: Any, adapter: Any, config: VARConfig,
                        layers: list[int] | None = None) -> "VARTables":
        from .stats_io import read_stats

        df, meta = read_stats(path)
        if meta.get("split") not in (None, "calibration"):
            # tables must be verified on held-out calibration text, never on the split they are judged on
            import warnings

            warnings.warn(f"{path}: statistics are from split {meta.get('split')!r}, not 'calibration'", stacklevel=2)
        return cls.from_stats(df, meta, model, adapter, config, layers, source=str(path))

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        p = Path(path)
        tensors = {f"layer{l}.{n}": getattr(t, n).contiguous() for l, t in self.layers.items() for n in LayerTable.NAMES}
        meta = {**self.metadata, "sizes": {str(l): s for l, s in self.sizes().items()}, "format_version": FORMAT_VERSION}
        save_file(tensors, str(p), metadata={"varmoe_tables": json.dumps(meta)})
        p.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path, model: Any = None, adapter: Any = None, check_fingerprint: bool = True) -> "VARTables":
        from safetensors import safe_open

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"VAR tables file {p} does not exist (build it with `varmoe build-tables`)")
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("varmoe_tables", "null"))
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except Exception as exc:
            raise InvalidInputError(f"{p} is not a VAR tables file ({exc})") from exc
        if not isinstance(meta, dict):
            raise InvalidInputError(f"{p} has no VAR tables metadata; was it written by VARTables.save?")
        layers = {int(l): LayerTable(*(tensors[f"layer{l}.{n}"] for n in LayerTable.NAMES)) for l in meta["layers"]}
        tables = cls(layers, meta)
        if model is not None:
            tables.check_model(model, adapter, check_fingerprint=check_fingerprint, source=str(p))
        return tables

    def check_model(self, model: Any, adapter: Any = None, check_fingerprint: bool = True, source: str = "tables") -> None:
        from ..adapters import get_adapter

        adapter = adapter or get_adapter(model)
        ident = model_identity(model, adapter)
        keys = ["model_type", "vocab_size", "num_experts", "top_k"] + (["router_fingerprint"] if check_fingerprint else [])
        for key in keys:
            if self.metadata.get(key) != ident[key]:
                raise InvalidInputError(
                    f"VAR tables {source} were built for {key}={self.metadata.get(key)!r} (model "
                    f"{self.metadata.get('model')!r}) but this model has {key}={ident[key]!r}; rebuild them "
                    "with `varmoe build-tables` for this model"
                )
        moe = {m.layer for m in adapter.moe_layers(model)}
        extra = sorted(set(self.layers) - moe)
        if extra:
            raise InvalidInputError(f"VAR tables {source} have layers {extra} that are not MoE layers of this model ({sorted(moe)})")
