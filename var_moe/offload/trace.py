"""Routing traces for offloading studies: record them from a model, load them, reshape them.

A `Trace` is a decoding-style stream: sequences one after another, every token with the experts
its router chose at every MoE layer (`experts_TLK`, top expert first), their router probabilities
(`probs_TLK`), and the speculative next-layer prediction (`spec_TLK[t, l]`: layer l's router
applied to the hidden state entering layer l-1's MoE block, -1 for layer 0), which is what
Mixtral-offloading prefetches with.

- `record_trace(model, tokenizer, TraceConfig(...))`: teacher-forced text through the model.
  Routing comes from forward hooks on the real routers (`RoutingRecorder`); the speculative
  prediction from a forward pre-hook on MoE block l-1 that calls block l's router module on the
  hidden state it receives (the model's own gate, no copied modeling code). Teacher forcing gives
  the routing decoding would give for the same tokens: the model is causal.
- `load_routing_array(path)`: a (tokens, layers, top-k) integer array as returned by vLLM with its
  routed-experts output on (`.npy`, or `.safetensors` with one tensor), optional token ids and
  sequence lengths; no probabilities or speculative predictions.
- `Trace.read(path)` / `trace.write(path)`: the Parquet file of `schema.py`.
- `trace.map_layers(n)`: layer m of an n-layer model takes trace layer m mod L (to price a small
  model's routing at a large model's shape; see docs/OFFLOAD.md for what that does and does not mean).

Shapes: T tokens, L layers, K top-k. Test: `pytest tests/test_offload_trace.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..corpus import SPLITS
from ..errors import InvalidInputError
from .schema import read_trace_table, write_trace_table


@dataclass
class Trace:
    token_ids_T: np.ndarray  # int32
    seq_T: np.ndarray  # int32, non-decreasing sequence index
    experts_TLK: np.ndarray  # int16
    num_experts: int
    layers: list[int]  # decoder index of every traced MoE layer
    probs_TLK: np.ndarray | None = None  # float32 router probability of each chosen expert
    spec_TLK: np.ndarray | None = None  # int16 speculative prediction, -1 = none
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        e = self.experts_TLK
        if e.ndim != 3:
            raise InvalidInputError(f"a routing trace must be shaped (tokens, layers, top-k), got {e.shape}")
        t, l, k = e.shape
        if self.token_ids_T.shape != (t,) or self.seq_T.shape != (t,):
            raise InvalidInputError("token ids and sequence ids must have one entry per token of the routing array")
        if len(self.layers) != l:
            raise InvalidInputError(f"{len(self.layers)} layer indices for a routing array with {l} layers")
        if t and (int(e.min()) < 0 or int(e.max()) >= self.num_experts):
            raise InvalidInputError(f"expert ids must lie in [0, {self.num_experts}), got {int(e.min())}..{int(e.max())}")
        if t and bool(np.any(np.diff(self.seq_T) < 0)):
            raise InvalidInputError("sequence ids must be non-decreasing: a trace is one stream in decoding order")
        for name in ("probs_TLK", "spec_TLK"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != e.shape:
                raise InvalidInputError(f"{name} must have the routing array's shape {e.shape}, got {arr.shape}")

    @property
    def num_tokens(self) -> int:
        return int(self.experts_TLK.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts_TLK.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts_TLK.shape[2])

    @property
    def prev_T(self) -> np.ndarray:
        """Previous token of the same sequence, -1 at a sequence start."""
        prev = np.empty_like(self.token_ids_T)
        prev[0:1] = -1
        prev[1:] = np.where(self.seq_T[1:] == self.seq_T[:-1], self.token_ids_T[:-1], -1)
        return prev

    @property
    def has_spec(self) -> bool:
        return self.spec_TLK is not None and bool(np.any(self.spec_TLK >= 0))

    def slice_tokens(self, n: int) -> "Trace":
        """The first n tokens (for quick runs and benchmarks)."""
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        return Trace(self.token_ids_T[:n], self.seq_T[:n], self.experts_TLK[:n], self.num_experts, list(self.layers),
                     cut(self.probs_TLK), cut(self.spec_TLK), dict(self.metadata))

    def map_layers(self, num_layers: int) -> "Trace":
        """A trace for a model with `num_layers` layers: layer m takes trace layer m mod L.

        Cyclic, so that layer m-1 is the layer the speculative prediction of layer m came from
        (except where m mod L == 0: no prediction there, as for layer 0)."""
        if num_layers < 1:
            raise InvalidInputError("the target layer count must be >= 1")
        src = np.arange(num_layers) % self.num_layers
        pick = lambda a: None if a is None else np.ascontiguousarray(a[:, src])  # noqa: E731
        meta = {**self.metadata, "layer_map": f"cyclic m -> m mod {self.num_layers}", "source_layers": list(self.layers)}
        return Trace(self.token_ids_T, self.seq_T, pick(self.experts_TLK), self.num_experts, list(range(num_layers)),
                     pick(self.probs_TLK), pick(self.spec_TLK), meta)

    # -- files -------------------------------------------------------------------------------
    def write(self, path: str | Path) -> Path:
        t, l, k = self.experts_TLK.shape
        position = np.zeros(t, dtype=np.int32)
        if t:
            starts = np.r_[0, np.flatnonzero(np.diff(self.seq_T)) + 1]
            position = np.arange(t) - np.repeat(starts, np.diff(np.r_[starts, t]))
        probs = self.probs_TLK if self.probs_TLK is not None else np.full((t, l, k), np.nan, np.float32)
        spec = self.spec_TLK if self.spec_TLK is not None else np.full((t, l, k), -1, np.int16)
        meta = {**self.metadata, "layers": list(self.layers), "num_experts": self.num_experts, "top_k": k,
                "num_tokens": t, "num_sequences": int(len(np.unique(self.seq_T))),
                "has_probs": self.probs_TLK is not None, "has_spec": self.spec_TLK is not None}
        cols = {"seq_id": self.seq_T, "position": position, "token_id": self.token_ids_T,
                "experts_LK": self.experts_TLK.reshape(t, l * k), "top_probs_LK": probs.reshape(t, l * k),
                "spec_experts_LK": spec.reshape(t, l * k)}
        return write_trace_table(cols, path, meta)

    @classmethod
    def read(cls, path: str | Path) -> "Trace":
        cols, meta = read_trace_table(path)
        t, l, k = len(cols["token_id"]), len(meta["layers"]), int(meta["top_k"])
        shape = (t, l, k)
        probs = cols["top_probs_LK"].reshape(shape) if meta.get("has_probs", True) else None
        spec = cols["spec_experts_LK"].reshape(shape) if meta.get("has_spec", True) else None
        return cls(cols["token_id"], cols["seq_id"], cols["experts_LK"].reshape(shape), int(meta["num_experts"]),
                   [int(x) for x in meta["layers"]], probs, spec, meta)


def _load_array(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)  # never unpickle a user's file
        except ValueError as exc:
            raise InvalidInputError(f"{path}: not a plain numeric .npy array ({exc})") from exc
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise InvalidInputError(f"{path}: expected exactly one tensor, found {sorted(tensors)}")
        return next(iter(tensors.values()))
    raise InvalidInputError(f"{path}: {what} must be a .npy or .safetensors file")


def load_routing_array(path: str | Path, num_experts: int, token_ids: str | Path | None = None,
                       seq_lengths: str | Path | None = None) -> Trace:
    """A Trace from a (tokens, layers, top-k) expert-id array (vLLM's routed-experts output shape).

    Without `token_ids` every token gets id -1 (token-table predictors then predict nothing);
    without `seq_lengths` the whole array is one sequence."""
    routing = _load_array(Path(path), "routing array")
    if routing.ndim != 3 or not np.issubdtype(routing.dtype, np.integer):
        raise InvalidInputError(f"{path}: the routing array must be integer, shaped (tokens, layers, top-k); got "
                                f"{routing.dtype} {routing.shape}")
    t = routing.shape[0]
    ids = np.full(t, -1, np.int32) if token_ids is None else _load_array(Path(token_ids), "token ids").reshape(-1).astype(np.int32)
    if ids.shape[0] != t:
        raise InvalidInputError(f"{token_ids}: {ids.shape[0]} token ids for {t} routed tokens")
    if seq_lengths is None:
        seq = np.zeros(t, np.int32)
    else:
        lengths = _load_array(Path(seq_lengths), "sequence lengths").reshape(-1).astype(np.int64)
        if lengths.sum() != t or bool((lengths < 1).any()):
            raise InvalidInputError(f"{seq_lengths}: sequence lengths must be >= 1 and sum to {t} tokens")
        seq = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    meta = {"source": f"routing-array:{Path(path).name}", "model": None}
    return Trace(ids, seq, routing.astype(np.int16), int(num_experts), list(range(routing.shape[1])), metadata=meta)


# -- recording from a model -------------------------------------------------------------------
@dataclass(frozen=True)
class TraceConfig:
    model: str  # folder or hub id, recorded in the metadata
    dataset: str = "stdlib"
    split: str = "test"
    num_samples: int | None = 64  # sequences
    max_length: int = 256
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise InvalidInputError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.num_samples is not None and self.num_samples < 1:
            raise InvalidInputError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_length < 2 or self.batch_size < 1:
            raise InvalidInputError("--max-length must be >= 2 and --batch-size >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TraceConfig":
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(f"unknown trace config fields {sorted(unknown)}")
        return cls(**data)


class _SpeculativeHooks:
    """Pre-hooks on MoE blocks 0..L-2: call block l+1's router on the hidden state entering block l."""

    def __init__(self, moe_layers: list[Any], adapter: Any):
        self.moe_layers, self.adapter = moe_layers, adapter
        self.active = False  # True while a hook calls a router, so the recorder ignores that call
        self.pred: dict[int, torch.Tensor] = {}  # traced layer index -> (T, K) predicted top-k
        self._handles: list[Any] = []

    def _make(self, i: int):
        nxt = self.moe_layers[i + 1]

        def hook(module: torch.nn.Module, args: tuple) -> None:
            hidden = args[0]
            self.active = True
            try:
                out = getattr(nxt.block, nxt.router_attr)(hidden.reshape(-1, hidden.shape[-1]))
            finally:
                self.active = False
            self.pred[i + 1] = self.adapter.decision(out).topk_idx_TK.detach()

        return hook

    def __enter__(self) -> "_SpeculativeHooks":
        for i, m in enumerate(self.moe_layers[:-1]):
            self._handles.append(m.block.register_forward_pre_hook(self._make(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def record_trace(model: Any, tokenizer: Any, config: TraceConfig, progress: bool = False) -> Trace:
    """Teacher-force `config`'s split through `model` and return the routing trace (padding dropped)."""
    from ..adapters import get_adapter
    from ..capture.recorder import RoutingRecorder
    from ..capture.schema import library_versions
    from ..corpus import iter_batches
    from ..loading import model_device, portable_path
    from .hardware import shape_from_config

    adapter = get_adapter(model)
    moe = adapter.moe_layers(model)
    nl, k = len(moe), adapter.top_k
    index_of = {m.layer: i for i, m in enumerate(moe)}
    spec = _SpeculativeHooks(moe, adapter)
    batch_routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_route(layer: int, tokens: Any, decision: Any) -> None:
        if spec.active:
            return
        idx_TK = decision.topk_idx_TK
        batch_routing[index_of[layer]] = (idx_TK.detach(), decision.probs_TE.gather(1, idx_TK.long()).detach())

    out_ids, out_seq, out_e, out_p, out_s = [], [], [], [], []
    seq_base = 0
    device = model_device(model)
    batches = iter_batches(tokenizer, config.dataset, config.split, config.max_length, config.batch_size, config.num_samples)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="trace", unit="batch")
    with RoutingRecorder(model, callback=on_route, adapter=adapter), spec:
        for ids_BS, mask_BS in batches:
            batch_routing.clear()
            spec.pred.clear()
            model(input_ids=ids_BS.to(device), attention_mask=mask_BS.to(device))
            b, s = ids_BS.shape
            valid_T = mask_BS.reshape(-1).bool()
            e_TLK = torch.stack([batch_routing[i][0] for i in range(nl)], dim=1).cpu()
            p_TLK = torch.stack([batch_routing[i][1] for i in range(nl)], dim=1).float().cpu()
            s_TLK = torch.full((b * s, nl, k), -1, dtype=torch.long)
            for i, pred_TK in spec.pred.items():
                s_TLK[:, i] = pred_TK.long().cpu()
            seq_T = (torch.arange(b).repeat_interleave(s) + seq_base)
            out_ids.append(ids_BS.reshape(-1)[valid_T])
            out_seq.append(seq_T[valid_T])
            out_e.append(e_TLK[valid_T])
            out_p.append(p_TLK[valid_T])
            out_s.append(s_TLK[valid_T])
            seq_base += b
    if not out_ids:
        raise InvalidInputError(f"dataset {config.dataset!r} split {config.split!r} produced no sequences")
    # result files record the model's name, never this machine's absolute paths
    meta = {"model": str(getattr(model.config, "_name_or_path", config.model)),
            "config": {**config.to_dict(), "model": portable_path(config.model)},
            "source": "teacher-forced", "model_type": getattr(model.config, "model_type", None),
            "vocab_size": int(model.config.vocab_size), "versions": library_versions(),
            "spec_definition": "spec[t, l] = top-k of router l applied to the hidden state entering MoE block l-1",
            "shape": shape_from_config(model.config, name=str(getattr(model.config, "_name_or_path", config.model))).to_dict()}
    return Trace(torch.cat(out_ids).numpy().astype(np.int32), torch.cat(out_seq).numpy().astype(np.int32),
                 torch.cat(out_e).numpy().astype(np.int16), adapter.num_experts, [m.layer for m in moe],
                 torch.cat(out_p).numpy().astype(np.float32), torch.cat(out_s).numpy().astype(np.int16), meta)
