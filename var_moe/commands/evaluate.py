"""`varmoe evaluate`: perplexity, throughput and routing of the baseline model or of VAR on held-out text.

    varmoe evaluate --mode baseline --split test --num-docs 6 --output results/phase2/baseline.json   # whole documents
    varmoe evaluate --mode var --tables models/reference-moe/var/var_tables.safetensors --stride 128 \
        --timing-batches 8 --output results/phase2/ppl_sliding_balanced.json  # the whole test split, sliding windows
    varmoe evaluate --mode var --routing-stats calib.parquet --preset balanced --split test \
        --num-samples 64 --output results/phase2/var_balanced.json [--adaptive-k] [--weights-source learned]
    varmoe evaluate --compare baseline.json var.json        # the seed's spelling of `varmoe compare`

A `--mode var` run also times the unmodified model interleaved with VAR in the same process (the
paired speedup `varmoe compare` reports). Perplexity is scored on sliding windows of --max-length
tokens advancing by --stride (default half the window; every token of a document scored once, with
at least max-length - stride tokens of context), or with `--scoring pieces` on back-to-back pieces;
--num-samples, --max-per-doc and --num-docs cap windows/pieces in all, per document, and documents
(default: every document of the split, whole). The seed's spellings (--num_samples, --routing_stats) are
accepted. Parses flags, builds a config, calls `var_moe.var.evaluate`. Test: `pytest tests/test_var_eval.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import add_dataset_flags, add_model_flags, load_spec


def register(sub: argparse._SubParsersAction) -> None:
    from ._var import add_var_flags

    p = sub.add_parser("evaluate", help="Phase 2: evaluate the baseline model or VAR (perplexity, throughput, routing)")
    p.add_argument("--mode", choices=["baseline", "var"], help="what to evaluate (required unless --compare)")
    p.add_argument("--compare", nargs=2, metavar=("BASELINE_JSON", "VAR_JSON"), default=None,
                   help="compare two evaluate outputs instead (same as `varmoe compare A B`)")
    add_model_flags(p)
    add_dataset_flags(p, default_split="test")
    add_var_flags(p)
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the batches (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up forwards per mode")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples over documents")
    p.add_argument("--max-per-doc", dest="max_per_doc", type=int, default=0,
                   help="at most this many windows (or pieces) per document (default 0 = whole documents)")
    p.add_argument("--num-docs", dest="num_docs", type=int, default=None,
                   help="score the first this many documents of the split, each whole (default: all documents)")
    p.add_argument("--scoring", choices=["sliding", "pieces"], default="sliding",
                   help="sliding windows (default; the perplexity criterion's scoring) or back-to-back max-length pieces")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding windows advance by this many tokens, 1..--max-length (default max-length // 2)")
    p.add_argument("--timing-batches", dest="timing_batches", type=int, default=None,
                   help="time only the first this many batches (default all; perplexity always uses all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", default=None, help="JSON file to write (required with --mode)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import InvalidInputError
    from ..loading import load_model
    from ..var.eval_data import check_stride, scoring_info, sliding_batches
    from ..var.evaluate import eval_batches, evaluate_quality_and_speed
    from ._var import config_from_args, tables_from_args

    if args.compare:
        from .compare import print_comparison

        return print_comparison(args.compare[0], args.compare[1], None)
    if args.mode is None or args.output is None:
        raise InvalidInputError("--mode and --output are required (or give --compare BASELINE_JSON VAR_JSON)")
    stride = None
    if args.scoring == "sliding":
        stride = args.max_length // 2 if args.stride is None else args.stride
        check_stride(args.max_length, stride)
    elif args.stride is not None:
        raise InvalidInputError("--stride applies to --scoring sliding only")
    for flag, v in (("--num-docs", args.num_docs), ("--timing-batches", args.timing_batches), ("--num-samples", args.num_samples)):
        if v is not None and v < 1:
            raise InvalidInputError(f"{flag} must be >= 1, got {v}")
    spec = load_spec(args)
    config = config_from_args(args) if args.mode == "var" else None
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(spec)
    tables = tables_from_args(args, model, config, tokenizer) if args.mode == "var" else None
    if stride is None:
        batches = eval_batches(tokenizer, args.dataset, args.split, args.num_samples, args.max_length, args.batch_size,
                               args.max_per_doc or None, max_docs=args.num_docs)
    else:
        batches = sliding_batches(tokenizer, args.dataset, args.split, args.max_length, stride, args.batch_size,
                                  max_docs=args.num_docs, max_windows_per_doc=args.max_per_doc or None,
                                  num_windows=args.num_samples)
    info = {"model": args.model, "dataset": args.dataset, "split": args.split, "num_samples": args.num_samples,
            "max_length": args.max_length, "batch_size": args.batch_size, "preset": args.preset if args.mode == "var" else None,
            "routing_stats": args.routing_stats, "tables": args.tables, "max_per_doc": args.max_per_doc,
            "num_docs": args.num_docs}
    result = evaluate_quality_and_speed(model, tokenizer, args.mode, batches, config=config, tables=tables, repeats=args.repeats,
                      warmup=args.warmup, bootstrap=args.bootstrap, seed=args.seed, info=info,
                      timing_batches=args.timing_batches, scoring=scoring_info(batches, args.max_length, stride))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    ev, tp = result["evaluation"], result["throughput"]
    sc = result["scoring"]
    print(f"{args.mode}: perplexity {ev['perplexity']:.4f} over {ev['predicted_tokens']} tokens of {sc['documents']} "
          f"documents ({sc['method']}, window {sc['window']}, stride {sc['stride']}), "
          f"{tp['tokens_per_second']:.1f} tokens/s -> {out}")
    if args.mode == "var":
        d = result["var_stats"]["overall"]["routing_distribution"]
        print(f"  fast {100 * d['fast']:.1f}%  learned {100 * d['learned']:.1f}%  "
              f"paired speedup {result['paired']['speedup']:.3f}x")
        pb = result["paired"]["perplexity_bootstrap"]
        print(f"  perplexity change {pb['diff_pct']:+.3f}% (95% CI {pb['ci95_pct'][0]:+.3f} .. {pb['ci95_pct'][1]:+.3f}, "
              f"paired bootstrap over {pb['documents']} documents)")
    return 0
