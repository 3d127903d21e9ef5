"""The measured frontier behind the presets: table knobs x runtime knobs -> coverage, held-out
agreement, perplexity change, paired speed ratio.

Stage 1 (tables, cheap): for every (target agreement, minimum frequency, entropy cap or none,
per-document cap) tables are rebuilt from saved calibration evidence and scored on test evidence
(`validation.served`): coverage and agreement per layer with document-bootstrap intervals.
Stage 2 (runtime, model runs): for each table point `runtime_points` picks and each adaptive-k
setting: perplexity of VAR vs the unmodified model on whole test documents (sliding windows,
eval_data.py) with a paired bootstrap interval over documents, and the paired speed ratio
(`evaluate.speed_ratios`, median over repeats, tables frozen).
Every point is appended to a JSON file at once and points already there are skipped, so an
interrupted sweep resumes; resuming with another perplexity scoring, or another choosing scheme
(`chooser`: e.g. training-split documents choose every table's sets), is refused.
CLI: `varmoe sweep`. Test: `pytest tests/test_var_sweep.py tests/test_var_choosing.py`.
"""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InvalidInputError
from .config import VARConfig
from .evaluate import EvalBatch, doc_nll, paired_bootstrap, paired_times, speed_ratios


@dataclass(frozen=True)
class SweepGrid:
    targets: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    min_frequencies: tuple[int, ...] = (5, 20, 50)
    entropy_caps: tuple[float | None, ...] = (None, 0.85)
    per_document_caps: tuple[int | None, ...] = (1, 4)
    adaptive_k: tuple[float | None, ...] = (None, 0.9, 0.8)
    repeats: int = 5
    warmup: int = 2

    def __post_init__(self) -> None:
        if not self.targets or any(not 0 < t <= 1 for t in self.targets):
            raise InvalidInputError("--targets must be numbers in (0, 1]")
        if self.repeats < 1 or self.warmup < 0:
            raise InvalidInputError("--repeats must be >= 1 and --warmup >= 0")

    def table_configs(self, base: VARConfig) -> list[VARConfig]:
        return [base.replace(target_agreement=t, frequency_threshold=f, entropy_threshold=e, max_per_document=c)
                for t, f, e, c in itertools.product(self.targets, self.min_frequencies, self.entropy_caps,
                                                   self.per_document_caps)]


def table_key(cfg: VARConfig) -> str:
    return (f"t{cfg.target_agreement}-f{cfg.frequency_threshold}-e{cfg.entropy_threshold}-"
            f"c{cfg.max_per_document}-{cfg.multiplicity}")


EVEN_ODD = "even/odd documents of the calibration evidence"


def _load(path: Path, chooser: Any) -> dict[str, Any]:
    """The sweep file at `path` (new if absent), refused if its tables chose sets otherwise than
    `chooser` (the choosing evidence, or None: even/odd documents) does."""
    scheme = EVEN_ODD
    if chooser is not None:
        m = chooser.metadata
        scheme = (f"{m.get('dataset')}/{m.get('split')}: {m.get('num_documents')} documents, "
                  f"{m.get('num_tokens')} tokens")
    if not path.exists():
        return {"tables": [], "runtime": [], "baseline": None, "choosing": scheme}
    doc = json.loads(path.read_text(encoding="utf-8"))
    found = doc.setdefault("choosing", EVEN_ODD)  # files before the choosing option all chose even/odd
    if found != scheme:
        raise InvalidInputError(f"{path} holds a sweep whose tables chose sets on {found!r}, not {scheme!r}; "
                                "write this one to another --output")
    return doc


def _save(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def sweep_tables(calibration: Any, test: Any, model: Any, adapter: Any, grid: SweepGrid, base: VARConfig,
                 out: Path, log: Callable[[str], None] = print, chooser: Any = None) -> dict[str, Any]:
    from ..validation.served import served_agreement
    from .tables import VARTables

    doc = _load(out, chooser)
    done = {r["key"] for r in doc["tables"]}
    for cfg in grid.table_configs(base):
        key = table_key(cfg)
        if key in done:
            continue
        tables = VARTables.from_evidence(calibration, model, adapter, cfg, choose_evidence=chooser)
        s = served_agreement(tables, test, resamples=1000)
        layers = s["layers"]
        row = {"key": key, "config": {k: getattr(cfg, k) for k in ("target_agreement", "frequency_threshold",
                                                                    "entropy_threshold", "max_per_document", "multiplicity")},
               "sizes": tables.sizes(), "coverage": s["overall"]["coverage"], "agreement": s["overall"]["agreement"],
               "layers": layers, "all_layers_meet_target": all(v["meets_target"] in (True, None) for v in layers.values()),
               "all_layers_ci_above_target": all(v["agreement_ci95"] is None or v["agreement_ci95"][0] >= cfg.target_agreement
                                                 for v in layers.values())}
        doc["tables"].append(row)
        _save(out, doc)
        log(f"{key}: coverage {100 * row['coverage']:.1f}%  agreement "
            f"{100 * (row['agreement'] or 0):.1f}%  layers on target: {row['all_layers_meet_target']}")
    return doc


def runtime_points(doc: dict[str, Any], named: dict[str, VARConfig]) -> list[str]:
    """Table keys worth model runs: the named configs (the presets) and, for the loosest target
    (the degradation check), its largest coverage. Named keys must be points of the table grid."""
    rows = doc["tables"]
    keys = [table_key(cfg) for cfg in named.values()]
    missing = [k for k in keys if k not in {r["key"] for r in rows}]
    if missing:
        raise InvalidInputError(f"named configs {missing} are not points of the table grid; widen the grid")
    loose = min(r["config"]["target_agreement"] for r in rows)
    keys.append(max((r for r in rows if r["config"]["target_agreement"] == loose), key=lambda r: r["coverage"])["key"])
    return list(dict.fromkeys(keys))


def sweep_runtime(calibration: Any, model: Any, adapter: Any, ppl_batches: list[EvalBatch],
                  speed_batches: list[EvalBatch], grid: SweepGrid, base: VARConfig, keys: list[str], out: Path,
                  log: Callable[[str], None] = print, scoring: dict[str, Any] | None = None,
                  chooser: Any = None) -> dict[str, Any]:
    from .tables import VARTables
    from .wrapper import VARModelWrapper

    doc = _load(out, chooser)
    device = next(model.parameters()).device
    if doc.get("baseline") is None:
        nll, cnt = doc_nll(model, ppl_batches, device)
        doc["baseline"] = {"nll": nll.tolist(), "count": cnt.tolist(), "documents": len(nll), "tokens": int(cnt.sum()),
                           "scoring": scoring}
        _save(out, doc)
    elif not _same_scoring(doc["baseline"], scoring):
        raise InvalidInputError(f"{out} holds perplexities scored as {doc['baseline'].get('scoring')}, not as {scoring}: "
                                "the paired differences would mix scorings; give another --output")
    b_nll, b_cnt = np.asarray(doc["baseline"]["nll"]), np.asarray(doc["baseline"]["count"])
    done = {r["key"] for r in doc["runtime"]}
    for key in keys:
        table_cfg = base.replace(**next(r for r in doc["tables"] if r["key"] == key)["config"])
        tables = VARTables.from_evidence(calibration, model, adapter, table_cfg, choose_evidence=chooser)
        for k in grid.adaptive_k:
            cfg = table_cfg.replace(adaptive_k=k is not None, adaptive_k_min_weight=k or base.adaptive_k_min_weight)
            rkey = f"{table_key(cfg)}-k{cfg.adaptive_k_min_weight if cfg.adaptive_k else None}"
            if rkey in done:
                continue
            with VARModelWrapper(model, cfg, tables=tables) as w, w.frozen_tables():
                w.reset_stats()
                v_nll, v_cnt = doc_nll(w, ppl_batches, device)
                dist = w.get_performance_stats()["overall"]["routing_distribution"]
                times = paired_times(model, w, speed_batches, device, grid.repeats, grid.warmup)
            ratios = speed_ratios(times)
            ppl = paired_bootstrap(b_nll, b_cnt, v_nll, v_cnt, 1000, 0)
            row = {"key": rkey, "table_key": key, "adaptive_k_min_weight": k,
                   "target_agreement": table_cfg.target_agreement, "routing_distribution": dist,
                   "perplexity_change_pct": ppl["diff_pct"], "perplexity_change_ci95_pct": ppl["ci95_pct"],
                   "speed_ratio": statistics.median(ratios), "speed_ratio_per_repeat": ratios}
            doc["runtime"].append(row)
            _save(out, doc)
            log(f"{rkey}: fast {100 * dist['fast']:.1f}%  ppl "
                f"{ppl['diff_pct']:+.2f}% [{ppl['ci95_pct'][0]:+.2f}, {ppl['ci95_pct'][1]:+.2f}]  speed x{row['speed_ratio']:.3f}")
    return doc


def _same_scoring(stored: dict[str, Any], scoring: dict[str, Any] | None) -> bool:
    """A stored baseline may be resumed only with the same scoring. Files from before the scoring
    was recorded hold back-to-back pieces of their `documents` documents."""
    if "scoring" in stored:
        return stored["scoring"] == scoring
    return scoring is None or (scoring["method"] == "back-to-back pieces" and scoring["documents"] == stored["documents"])


def render_runtime(doc: dict[str, Any]) -> str:
    """The runtime points as a markdown table (what docs/PHASE2.md quotes)."""
    tables = {r["key"]: r for r in doc["tables"]}
    lines = ["| target | min freq | per-doc cap | adaptive k | fast | test agreement (served) | "
             "perplexity change (95% CI) | speed ratio (repeats) |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["runtime"]:
        if r.get("cache"):  # a point of the removed cached tier, in a file written while it existed
            continue
        t = tables[r["table_key"]]
        c, d = t["config"], r["routing_distribution"]
        lo, hi = r["perplexity_change_ci95_pct"]
        reps = ", ".join(f"{x:.2f}" for x in r["speed_ratio_per_repeat"])
        lines.append(f"| {c['target_agreement']} | {c['frequency_threshold']} | {c['max_per_document']} | "
                     f"{r['adaptive_k_min_weight'] or 'off'} | {100 * d['fast']:.1f}% | "
                     f"{100 * (t['agreement'] or 0):.1f}% | {r['perplexity_change_pct']:+.2f}% "
                     f"({lo:+.2f}, {hi:+.2f}) | {r['speed_ratio']:.3f} ({reps}) |")
    return "\n".join(lines)
