"""What each part of VAR costs in batch-1 decoding: baseline vs VAR variants, interleaved.

Greedy generation of --new-tokens tokens from one short prompt on the reference model with its
committed tables, 1 thread. Variants (each a fresh `VARModelWrapper` from the tables' own config):
  baseline     - the unmodified model (original routers, no wrapper installed, no hooks)
  var          - the tables' config as committed (fast tier + counters)
  no-counters  - same with track_performance off (no per-layer tier counters)
  learned-only - fast tier off: every row takes the learned tier through VAR's code
Each variant keeps its wrapper for the whole run and is installed only while it is timed. Each
repeat runs every variant once (order rotated per repeat),
after one warm-up generation; the table gives the median time and the median of per-repeat
ratios to baseline.

Run: `python benchmarks/var_decode_ablation.py [--new-tokens 64] [--repeats 7]
[--variants baseline,var] [--extra-tables NAME=PATH ...] [--json F]` (an extra tables file is one
more variant with the committed tables' config).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from var_moe.loading import REFERENCE_MODEL_DIR, load_model
from var_moe.var.config import VARConfig
from var_moe.var.tables import VARTables
from var_moe.var.wrapper import VARModelWrapper

VARIANTS = {
    "baseline": None,
    "var": {},
    "no-counters": {"track_performance": False},
    "learned-only": {"enable_fast_path": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None, help="write the per-repeat times and the summary here")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants (baseline always runs)")
    ap.add_argument("--extra-tables", action="append", default=[], metavar="NAME=PATH",
                    help="one more variant: the committed tables' config with this tables file (repeatable), e.g. "
                         "tables with (previous, token) entries against the same token tables without them")
    args = ap.parse_args()
    if args.new_tokens < 1 or args.repeats < 1:
        ap.error("--new-tokens and --repeats must be >= 1")
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    tables = VARTables.load(f"{args.model}/var/var_tables.safetensors", model=model)
    base_config = VARConfig.from_dict(tables.metadata["config"])
    ids = tok("import os\nimport sys\n", return_tensors="pt")

    chosen = ["baseline"] + [v for v in args.variants.split(",") if v and v != "baseline"]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    extra = {}
    for spec in args.extra_tables:
        name, sep, path = spec.partition("=")
        if not sep or not name or name in VARIANTS or name in extra:
            ap.error(f"--extra-tables takes NAME=PATH with a new NAME, got {spec!r}")
        extra[name] = VARTables.load(path, model=model)
    chosen += list(extra)
    wrappers = {}
    for name, change in ((n, VARIANTS.get(n, {})) for n in chosen):
        wrappers[name] = VARModelWrapper(model, dataclasses.replace(base_config, **(change or {})), extra.get(name, tables))
        if change is None:
            wrappers[name].disable_var()
        wrappers[name].restore()
    gen = dict(**ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def timed(name: str) -> float:
        wrapper = wrappers[name]
        if name == "baseline":  # nothing installed: the model exactly as loaded
            model.generate(**gen)  # warm-up
            t0 = time.perf_counter()
            model.generate(**gen)
            return time.perf_counter() - t0
        wrapper.install()
        try:
            wrapper.generate(**gen)  # warm-up
            t0 = time.perf_counter()
            wrapper.generate(**gen)
            return time.perf_counter() - t0
        finally:
            wrapper.restore()

    names = chosen
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            times[name].append(timed(name))
    summary = {}
    print(f"batch-1 greedy decode, {args.new_tokens} new tokens, {args.repeats} interleaved repeats, 1 thread")
    print(f"{'variant':<14}{'median s':>10}{'tokens/s':>10}{'x baseline':>12}{'min-max ratio':>16}")
    for name in names:
        ratios = [b / t for b, t in zip(times["baseline"], times[name])]
        med = statistics.median(times[name])
        summary[name] = {"median_s": med, "tokens_per_s": args.new_tokens / med,
                         "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        print(f"{name:<14}{med:>10.4f}{args.new_tokens / med:>10.0f}{statistics.median(ratios):>12.3f}"
              f"{min(ratios):>8.3f}-{max(ratios):.3f}")
    first = next(iter(extra), None)
    for name in list(extra)[1:]:  # each further tables file against the first one, per repeat
        ratios = [a / b for a, b in zip(times[first], times[name])]
        summary[name][f"ratio_vs_{first}_median"] = statistics.median(ratios)
        print(f"{name} / {first}: median of per-repeat ratios {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"new_tokens": args.new_tokens, "repeats": args.repeats, "times_s": times, "summary": summary},
                      f, indent=2)


if __name__ == "__main__":
    main()
