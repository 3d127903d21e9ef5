"""`varmoe simulate`: expert offloading with a GPU cache, per policy, from a routing trace.

    varmoe simulate --trace trace.parquet --hardware rtx3060 --cache-size 2 --policy all --output sim.json \
        [--calibration-trace calib.parquet] [--tables TABLES] [--shape mixtral-8x7b] [--bits 2.6]

Prints a table of every policy (hit rate, bytes moved, stall share, tokens/s), writes JSON keyed
by policy name (plus predictor accuracy per layer) and a plot beside it (`<output stem>.png/.pdf`).
With `--shape mixtral-8x7b` a trace of another depth is mapped onto its 32 layers (layer m takes
trace layer m mod L); `--sizes-only` instead keeps the trace's layers, experts and top-k and takes
only the shape's expert and attention sizes (no layer mapping). Parses flags and calls `var_moe.offload`. Test: `pytest tests/test_offload_cli.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InvalidInputError


def register(sub: argparse._SubParsersAction) -> None:
    from ..offload.hardware import PROFILES, SHAPES
    from ..offload.simulator import POLICIES

    p = sub.add_parser("simulate", help="simulate expert offloading (cache policies, prefetching) on a routing trace")
    p.add_argument("--trace", required=True, help="trace Parquet file (varmoe trace)")
    p.add_argument("--hardware", default="rtx3060", help=f"hardware profile: {', '.join(sorted(PROFILES))}")
    p.add_argument("--cache-size", type=int, default=2, help="experts per layer held on the GPU")
    p.add_argument("--policy", default="all", help=f"'all' (the six main policies) and/or a comma list of: {', '.join(POLICIES)}")
    p.add_argument("--output", "-o", required=True, help="JSON file to write (the plot goes beside it)")
    p.add_argument("--tables", default=None, help="VAR tables (.safetensors); default: <trace model>/var/var_tables.safetensors")
    p.add_argument("--calibration-trace", default=None, help="calibration-split trace for the token modal table (and the (previous, token) table when the VAR tables hold none)")
    p.add_argument("--min-count", type=int, default=3, help="minimum evidence for a modal set from the calibration trace")
    p.add_argument("--shape", default="trace", help=f"model shape for sizes: 'trace' (the traced model) or {', '.join(SHAPES)}")
    p.add_argument("--sizes-only", action="store_true",
                   help="with a named --shape: price its expert and attention sizes at the trace's own layers, experts and top-k (no layer mapping)")
    p.add_argument("--bits", type=float, default=2.6, help="bits per expert weight incl. quantisation scales")
    p.add_argument("--attn-bits", type=float, default=4.0, help="bits per attention weight")
    p.add_argument("--overhead-ms", type=float, default=0.0, help="fixed software time per layer (ms)")
    p.add_argument("--demand-first", action="store_true",
                   help="demand fetches overtake prefetches not yet on the link (default: one first-in first-out queue)")
    p.add_argument("--max-tokens", type=int, default=None, help="simulate only the first N tokens")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.set_defaults(func=run)


def _default_tables(trace_meta: dict) -> Path | None:
    from ..loading import REPO_ROOT

    model = trace_meta.get("model")
    if not model:
        return None
    for base in (Path(model), REPO_ROOT / model):
        cand = base / "var" / "var_tables.safetensors"
        if cand.exists():
            return cand
    return None


def run(args: argparse.Namespace) -> int:
    from ..offload import predictors, report
    from ..offload.hardware import ModelShape, get_profile, get_shape, sizes_at_depth
    from ..offload.simulator import POLICIES, POLICIES_ALL, SimConfig, map_predictions, simulate_policies
    from ..offload.trace import Trace

    profile = get_profile(args.hardware)
    if args.overhead_ms:
        profile = profile.with_overhead(args.overhead_ms)
    names = [p.strip() for p in args.policy.split(",") if p.strip()]
    policies = tuple(dict.fromkeys(q for p in names for q in (POLICIES_ALL if p == "all" else (p,))))
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise InvalidInputError(f"--policy: unknown {bad or args.policy!r}; use 'all' or a comma list of {', '.join(POLICIES)}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InvalidInputError("--max-tokens must be >= 1")
    config = SimConfig(cache_size=args.cache_size, expert_bits=args.bits, attn_bits=args.attn_bits,
                       demand_first=args.demand_first)
    trace = Trace.read(args.trace)
    if args.max_tokens:
        trace = trace.slice_tokens(args.max_tokens)
    calib = Trace.read(args.calibration_trace) if args.calibration_trace else None
    tables = Path(args.tables) if args.tables else _default_tables(trace.metadata)
    if args.shape == "trace":
        if "shape" not in trace.metadata:
            raise InvalidInputError("--shape trace: this trace does not record its model's shape; pass --shape mixtral-8x7b")
        shape = ModelShape(**trace.metadata["shape"])
    else:
        shape = get_shape(args.shape)
        if args.sizes_only:
            shape = sizes_at_depth(shape, trace.num_layers, trace.num_experts, trace.top_k)
    if args.sizes_only and args.shape == "trace":
        raise InvalidInputError("--sizes-only needs a named --shape (the trace's own shape has its own sizes)")
    sources: dict = {}
    preds = predictors.all_predictions(trace, tables, calib, args.min_count, info=sources)
    accuracy = predictors.accuracy_report(trace, preds)
    sim_trace, sim_preds = trace, preds
    if shape.num_layers != trace.num_layers:
        sim_preds = map_predictions(preds, trace.num_layers, shape.num_layers)
        sim_trace = trace.map_layers(shape.num_layers)
    results = simulate_policies(sim_trace, sim_preds, config, profile, shape, policies)
    print(f"{args.trace}: {trace.num_tokens} tokens x {shape.num_layers} layers on {profile.name} "
          f"({shape.name}, {args.bits} bits, cache {args.cache_size}/layer)")
    print(report.format_table(results))
    print("predictors (test trace, before any layer mapping):")
    print(report.format_predictors(accuracy))
    meta = {"trace": str(args.trace), "trace_model": trace.metadata.get("model"), "tables": str(tables) if tables else None,
            "calibration_trace": args.calibration_trace, **sources, "config": config.to_dict(), "hardware": profile.to_dict(),
            "shape": shape.to_dict(), "layer_map": sim_trace.metadata.get("layer_map"), "predictors": accuracy}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.results_document(results, meta), indent=2, default=str) + "\n", encoding="utf-8")
    written = [out]
    if not args.no_plot:
        title = f"{shape.name} on {profile.name}, cache {args.cache_size}/layer, {args.bits} bits"
        written += report.save_figure(report.plot_policies(results, title), out.with_suffix(""))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
