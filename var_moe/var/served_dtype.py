"""Do VAR tables certified in one dtype hold in the dtype a server runs the model in?

In another dtype (e.g. bfloat16, vLLM's default, for a float32 checkpoint) the learned router sees
other hidden states and can pick other experts, so table rows may agree with it less often than
certified. `check_tables`, the start-up check, measures per layer how often table rows equal the
learned top-k set in the served dtype on a small held-in sample (the first `max_length` tokens of
`documents` documents of the tables' certifying split); a layer with at least MIN_ROWS table rows
under the tables' target fails. Each engine passes its own measure (`builtin_agreement`: the capture
hooks; vLLM: its device audit counters, var_moe.vllm.agreement); the verdict (`DtypeCheck`) is
published in `/var/status`.
Test: `pytest tests/test_served_dtype.py`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import InvalidInputError

DOCUMENTS = 16
MAX_LENGTH = 256
MIN_ROWS = 100  # a layer with fewer table rows in the sample is reported, not judged
DEFAULT_TARGET = 0.9
# the setting that serves despite a failed check (server: --var-dtype-check warn)
OVERRIDE = "--var-dtype-check warn"


class DtypeCheckFailed(InvalidInputError):
    """Table rows agree with the learned router in the served dtype less often than certified."""


def dtype_name(dtype: Any) -> str:
    """'float32' for torch.float32, 'float32', or vLLM's dtype objects."""
    return str(dtype).removeprefix("torch.")


def certified_dtype(metadata: Mapping[str, Any], model_dir: str | Path | None) -> str:
    """The dtype the tables' routing was computed in: recorded by `build-tables`, else the stored
    checkpoint's (the builtin engine loads a checkpoint as stored unless told otherwise)."""
    if metadata.get("dtype"):
        return dtype_name(metadata["dtype"])
    cfg = Path(model_dir) / "config.json" if model_dir else None
    if cfg is not None and cfg.is_file():
        conf = json.loads(cfg.read_text(encoding="utf-8"))
        stored = conf.get("dtype") or conf.get("torch_dtype")
        if stored:
            return dtype_name(stored)
    return "float32"


def sample_batches(metadata: Mapping[str, Any], tokenizer: Any, documents: int = DOCUMENTS,
                   max_length: int = MAX_LENGTH) -> list[Any]:
    """The first `max_length` tokens of the first `documents` documents of the certifying split."""
    from .eval_data import eval_batches

    cert = metadata.get("certifying") or {}
    dataset, split = cert.get("dataset"), cert.get("split")
    if not dataset or not split:
        raise InvalidInputError("the tables do not name their certifying dataset and split, so there is no "
                                "held-in sample to measure them on")
    return eval_batches(tokenizer, dataset, split, num_samples=documents, max_length=max_length,
                        batch_size=8, max_per_doc=1)


def builtin_agreement(model: Any, tables: Any, batches: list[Any]) -> dict[int, tuple[int, int]]:
    """{layer: (table rows equal to the learned set, table rows)} over the batches, the model
    routing in its own dtype (VAR off: the learned decision is what the capture hooks see)."""
    from .evidence import collect_evidence
    from .pairs import served_masks

    ev = collect_evidence(model, batches)
    out: dict[int, tuple[int, int]] = {}
    for layer, table in tables.layers.items():
        if layer not in ev.layers:
            continue
        lev = ev.layers[layer]
        m = served_masks(lev, table, tables.pair_tier.get(layer))
        n_R = lev.counts_R  # evidence rows are distinct (document, previous, token, set) with counts
        agree = int(n_R[m["token_agree"] | m["pair_agree"]].sum())
        total = int(n_R[m["token_served"] | m["pair_served"]].sum())
        out[int(layer)] = (agree, total)
    return out


@dataclass(frozen=True)
class DtypeCheck:
    served: str
    certified: str
    measured: bool  # False: same dtype, nothing to measure
    target: float = DEFAULT_TARGET
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> agree, rows, agreement
    failed_layers: tuple[int, ...] = ()
    sample: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed_layers

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "failed_layers": list(self.failed_layers), "ok": self.ok}

    def message(self) -> str:
        if not self.measured:
            return f"VAR tables certified in {self.certified}, served in {self.served}: same dtype, no check needed"
        per = ", ".join(f"layer {l} {v['agreement']:.3f} of {int(v['rows'])} rows" for l, v in self.layers.items())
        head = (f"VAR tables certified in {self.certified}, served in {self.served}: agreement of table rows with "
                f"the learned router in {self.served} on {self.sample}: {per or 'no table rows'} (target {self.target})")
        if self.ok:
            return head
        return (f"{head}; layers {list(self.failed_layers)} fall under the target. Serve in the tables' dtype "
                f"(--dtype {self.certified}), rebuild the tables in {self.served} (`varmoe build-tables --dtype "
                f"{self.served}`), or serve anyway with {OVERRIDE}")


def unchanged(served: str, certified: str) -> DtypeCheck:
    return DtypeCheck(served=served, certified=certified, measured=False)


def judge(served: str, certified: str, counts: Mapping[int, tuple[int, int]], target: float | None,
          sample: str) -> DtypeCheck:
    """Per-layer agreement; a layer with at least MIN_ROWS table rows under `target` fails."""
    target = DEFAULT_TARGET if target is None else float(target)
    layers, failed = {}, []
    for layer in sorted(counts):
        agree, rows = counts[layer]
        rate = agree / rows if rows else 1.0
        layers[str(layer)] = {"agree": int(agree), "rows": int(rows), "agreement": round(rate, 4)}
        if rows >= MIN_ROWS and rate < target:
            failed.append(int(layer))
    return DtypeCheck(served=served, certified=certified, measured=True, target=target, layers=layers,
                      failed_layers=tuple(failed), sample=sample)


def check_tables(served: Any, tables: Any, model_dir: str | Path | None, tokenizer: Any,
                 measure: Callable[[list[Any]], Mapping[int, tuple[int, int]]], refuse: bool) -> DtypeCheck:
    """The start-up check both engines run: nothing to measure when the served dtype is the tables'
    one, else `measure(batches)` (the engine's own agreement count) on the held-in sample, judged
    against the tables' target; logged, and raised when it fails and `refuse` is set."""
    served, certified = dtype_name(served), certified_dtype(tables.metadata, model_dir)
    if served == certified:
        check = unchanged(served, certified)
    else:
        batches = sample_batches(tables.metadata, tokenizer)
        cert = tables.metadata["certifying"]
        sample = (f"{sum(len(b.doc_B) for b in batches)} documents ({sum(b.tokens for b in batches)} tokens) "
                  f"of {cert['dataset']}/{cert['split']}")
        target = (tables.metadata.get("config") or {}).get("target_agreement")
        check = judge(served, certified, measure(batches), target, sample)
    logging.getLogger("varmoe.server").info("%s", check.message())
    if refuse and not check.ok:
        raise DtypeCheckFailed(check.message())
    return check
