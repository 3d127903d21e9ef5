"""`varmoe sweep`: the frontier the presets are read from (coverage, held-out agreement,
perplexity change, paired speed ratio) over table and runtime knobs.

    varmoe sweep --routing-stats models/reference-moe/var/routing_stats_calibration.parquet \
        --evidence cache/evidence_calibration.safetensors --test-evidence cache/evidence_test.safetensors \
        --output results/phase2/sweep.json --figure-dir results/phase2/figures [--stage tables|runtime|all] \
        [--choose-evidence cache/evidence_train.safetensors --choose-max-docs 600]

Evidence files are read when they exist, else collected (a routing pass) and written there. With
--choose-evidence every table chooses its sets there (another split, default train) and certifies
them on all calibration documents; without it, even calibration documents choose and odd ones certify.
Resumable: points already in --output are skipped. Library: `var_moe.var.sweep`.
Test: `pytest tests/test_var_sweep.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InvalidInputError
from ._common import add_model_flags, load_spec
from ._var import add_choose_flags, check_choose_flags, choose_evidence_from_args


def _floats(text: str, flag: str, none_ok: bool = False, kind: type = float) -> tuple:
    out = []
    for part in text.split(","):
        part = part.strip()
        if none_ok and part.lower() == "none":
            out.append(None)
            continue
        try:
            out.append(kind(part))
        except ValueError:
            raise InvalidInputError(f"{flag} takes comma-separated numbers{' or none' if none_ok else ''}, got {part!r}") from None
    return tuple(out)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Phase 2: measure the coverage / agreement / perplexity / speed frontier")
    add_model_flags(p)
    p.add_argument("--routing-stats", required=True, help="calibration capture (names the calibration documents)")
    p.add_argument("--evidence", required=True, help="calibration evidence file (read, or collected and written)")
    p.add_argument("--test-evidence", required=True, help="test-split evidence file (read, or collected and written)")
    p.add_argument("--output", "-o", required=True, help="sweep JSON (appended to and resumed)")
    p.add_argument("--figure-dir", default=None, help="write the frontier figure (PNG + PDF) here")
    p.add_argument("--stage", choices=["tables", "runtime", "all"], default="all")
    p.add_argument("--targets", default="0.5,0.8,0.9,0.95", help="target agreements (comma-separated)")
    p.add_argument("--min-frequencies", default="5,20,50", help="minimum frequencies on the choosing half")
    p.add_argument("--entropy-caps", default="none,0.85", help="entropy caps (share of ln E) or none")
    p.add_argument("--per-document-caps", default="1,4", help="certifying occurrences per document, or none")
    p.add_argument("--adaptive-k", default="none,0.9,0.8", help="adaptive-k thresholds to run, none = off")
    p.add_argument("--ppl-docs", type=int, default=16, help="whole test documents scored for perplexity")
    p.add_argument("--ppl-stride", type=int, default=None,
                   help="perplexity on sliding windows of the capture's max length advancing by this many tokens "
                        "(default half the window; equal to the window = back-to-back pieces)")
    p.add_argument("--speed-batches", type=int, default=6, help="batches of the timed interleaved passes")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median ratio reported)")
    p.add_argument("--split", default="test", help="split perplexity is scored on")
    add_choose_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..adapters import get_adapter
    from ..loading import load_model
    from ..var.config import PRESETS, get_preset
    from ..var.eval_data import check_stride, scoring_info, sliding_batches
    from ..var.evaluate import eval_batches
    from ..var.evidence import Evidence, collect_evidence
    from ..var.stats_io import read_stats_metadata
    from ..var.sweep import SweepGrid, runtime_points, sweep_runtime, sweep_tables
    from ..var.stats_io import check_split
    from ..var.tables import evidence_for_stats, model_identity

    grid = SweepGrid(_floats(args.targets, "--targets"), _floats(args.min_frequencies, "--min-frequencies", kind=int),
                     _floats(args.entropy_caps, "--entropy-caps", True),
                     _floats(args.per_document_caps, "--per-document-caps", True, int),
                     _floats(args.adaptive_k, "--adaptive-k", True), args.repeats)
    if args.ppl_docs < 1 or args.speed_batches < 1:
        raise InvalidInputError("--ppl-docs and --speed-batches must be >= 1")
    meta = read_stats_metadata(args.routing_stats)
    check_split(meta, args.routing_stats, False)
    cfg = meta.get("config") or {}
    max_length = int(cfg.get("max_length") or 256)
    stride = max_length // 2 if args.ppl_stride is None else args.ppl_stride
    try:
        check_stride(max_length, stride)
    except InvalidInputError:
        raise InvalidInputError(f"--ppl-stride must be an integer in [1, {max_length}] (the capture's max length), "
                                f"got {stride}") from None
    check_choose_flags(args, meta)
    model, tok = load_model(load_spec(args))
    adapter = get_adapter(model)
    chooser = choose_evidence_from_args(args, meta, model, adapter, tok)
    cal_path, test_path = Path(args.evidence), Path(args.test_evidence)
    if cal_path.exists():
        cal = Evidence.load(cal_path)
    else:
        cal = evidence_for_stats(meta, model, adapter, tok)
        cal.save(cal_path)
    dataset = cfg.get("dataset") or meta.get("dataset") or "stdlib"
    if test_path.exists():
        test = Evidence.load(test_path)
    else:
        b = eval_batches(tok, dataset, args.split, None, max_length, 8, max_per_doc=None)
        test = collect_evidence(model, b, adapter, {"dataset": dataset, "split": args.split, "max_length": max_length,
                                                    "router_fingerprint": model_identity(model, adapter)["router_fingerprint"]})
        test.save(test_path)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the frontier is over token entries (its grid includes entropy caps, which pair entries do not
    # have); the pair tier is measured on its own (analysis_jobs/pair_coverage.py)
    base = get_preset("balanced").replace(pair_entries=False)
    doc = sweep_tables(cal, test, model, adapter, grid, base, out, chooser=chooser)
    if args.stage in ("runtime", "all"):
        ppl = sliding_batches(tok, dataset, args.split, max_length, stride, 8, max_docs=args.ppl_docs)
        keys = runtime_points(doc, {name: get_preset(name) for name in PRESETS})
        doc = sweep_runtime(cal, model, adapter, ppl, ppl[: args.speed_batches], grid, base, keys, out,
                            scoring={k: v for k, v in scoring_info(ppl, max_length, stride).items() if k != "tokens_fed"},
                            chooser=chooser)
    doc["grid"] = json.loads(json.dumps(grid.__dict__, default=str))
    if doc.get("runtime"):
        from ..var.sweep import render_runtime

        print(render_runtime(doc))
    if args.figure_dir and doc.get("runtime"):
        from ..validation.figures import fig_frontier, save_figure

        paths = save_figure(fig_frontier(doc), args.figure_dir, "frontier")
        print(f"frontier figure: {', '.join(str(p) for p in paths)}")
    return 0
