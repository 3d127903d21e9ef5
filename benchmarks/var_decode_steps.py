"""Batch-1 decoding, VAR vs baseline, interleaved step by step: the ratio without the machine's drift.

Every contender is its own copy of the reference model (the VAR ones with a `VARModelWrapper`
installed for the whole run), all decoding the SAME token sequence (the baseline's greedy
continuation of the prompt, fed one token per step, teacher-forced, each with its own KV cache),
and the contenders take turns at every single decode step (order rotated per step,
`var_moe.timing`), so each step's times are taken within milliseconds of each other. On this
machine the same work runs 0.6x-1.5x as fast from one whole generation to the next, which is why
steps, not generations, are interleaved. Reported per contender: the median over all steps of the
per-step ratio baseline / contender (> 1 = faster than baseline) with a 95% bootstrap interval over
repeats, and the ratio of summed times per repeat (median).

`--generate` times whole `generate()` calls instead (greedy, --new-tokens, one per contender per
repeat in rotated order after a warm-up): the ratio a user sees, generate()'s own per-step work
included, but with the drift between generations in it.

Contenders: `baseline` (the model as loaded, nothing installed); the `--variants` (default `var`):
`var` (committed tables with their config), `no-counters` (track_performance off), `learned-only`
(fast tier off: every row takes the learned tier through VAR's code); and one per `--extra-tables NAME=PATH` (the committed tables' config with that
file; each further one is also compared with the one before it).

Run: `python -m benchmarks var_decode_steps [--new-tokens 64] [--repeats 21] [--variants var,learned-only]
[--extra-tables NAME=PATH ...] [--generate] [--output F]`. Where the time goes inside VAR:
`python -m cProfile -s tottime -m benchmarks var_decode_steps --repeats 3`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
from typing import Any

import torch

from var_moe.loading import REFERENCE_MODEL_DIR, load_model
from var_moe.timing import Variant, interleaved
from var_moe.var.config import VARConfig
from var_moe.var.tables import VARTables
from var_moe.var.wrapper import VARModelWrapper

PROMPT = "import os\nimport sys\n"
VARIANTS = {  # config changes from the committed tables' config
    "var": {},
    "no-counters": {"track_performance": False},
    "learned-only": {"enable_fast_path": False},
}


def bootstrap_ci(per_repeat: list[list[float]], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the median step ratio, resampling whole repeats."""
    rng = random.Random(seed)
    meds = []
    for _ in range(draws):
        pick = [r for _ in per_repeat for r in per_repeat[rng.randrange(len(per_repeat))]]
        meds.append(statistics.median(pick))
    meds.sort()
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def contenders(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any]] | None]:
    """name -> (tables path, config changes), None for the baseline."""
    committed = f"{args.model}/var/var_tables.safetensors"
    specs: dict[str, tuple[str, dict[str, Any]] | None] = {"baseline": None}
    for v in (x for x in args.variants.split(",") if x):
        if v not in VARIANTS:
            ap.error(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")
        specs[v] = (committed, VARIANTS[v])
    for spec in args.extra_tables:
        name, sep, path = spec.partition("=")
        if not sep or not name or name in specs or name in VARIANTS:
            ap.error(f"--extra-tables takes NAME=PATH with a new NAME, got {spec!r}")
        specs[name] = (path, {})
    return specs


def step_times(models: dict[str, Any], prompt: torch.Tensor, feed: torch.Tensor, repeats: int) -> dict[str, list[list[float]]]:
    """Seconds per contender, repeat and decode step (teacher-forced `feed`), turns rotated per step;
    the first repeat warms every contender up and is dropped."""
    past: dict[str, Any] = {}
    ones = torch.ones(1, prompt.shape[1] + len(feed), dtype=torch.long)

    def prefill() -> None:  # not timed: every repeat decodes from the prompt's cache again
        for n, m in models.items():
            past[n] = m(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True).past_key_values

    def step(n: str, i: int) -> None:
        o = models[n](input_ids=feed[i].view(1, 1), attention_mask=ones[:, :prompt.shape[1] + i + 1],
                      past_key_values=past[n], use_cache=True)
        past[n] = o.past_key_values

    with torch.no_grad():
        times = interleaved({n: Variant(lambda i, n=n: step(n, i)) for n in models}, len(feed), repeats + 1, warmup=0,
                            before_repeat=prefill)
    return {n: t[1:] for n, t in times.items()}


def generate_times(models: dict[str, Any], prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of one whole greedy generation per contender and repeat (rotated order, one warm-up each)."""
    gen = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
               min_new_tokens=new_tokens, do_sample=False)
    times = interleaved({n: Variant(lambda i, m=m: m.generate(**gen)) for n, m in models.items()}, 1, repeats, warmup=1)
    return {n: [t[0] for t in ts] for n, ts in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--variants", default="var", help=f"comma-separated VAR contenders of {', '.join(VARIANTS)}")
    ap.add_argument("--extra-tables", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--generate", action="store_true", help="time whole generate() calls instead of decode steps")
    ap.add_argument("--output", default=None, help="write the per-repeat times and the summary here")
    args = ap.parse_args(argv)
    if args.new_tokens < 1 or args.repeats < 2:
        ap.error("--new-tokens must be >= 1 and --repeats >= 2")
    torch.set_num_threads(1)
    specs = contenders(ap, args)
    models, wrappers = {}, {}
    for name, spec in specs.items():
        model, tok = load_model(args.model)
        models[name] = model
        if spec is not None:
            path, changes = spec
            committed = VARTables.load(f"{args.model}/var/var_tables.safetensors", model=model)
            config = dataclasses.replace(VARConfig.from_dict(committed.metadata["config"]), **changes)
            wrappers[name] = VARModelWrapper(model, config, VARTables.load(path, model=model))  # installed
    prompt = tok(PROMPT, return_tensors="pt")["input_ids"]
    names = list(specs)
    summary: dict[str, Any] = {}
    if args.generate:
        times = generate_times(models, prompt, args.new_tokens, args.repeats)
        print(f"batch-1 greedy generate(), {args.new_tokens} new tokens, {args.repeats} interleaved repeats, 1 thread")
        print(f"{'contender':<14}{'median s':>10}{'tokens/s':>10}{'x baseline':>12}{'min-max ratio':>16}")
        for n in names:
            ratios = [b / t for b, t in zip(times["baseline"], times[n])]
            med = statistics.median(times[n])
            summary[n] = {"median_s": med, "tokens_per_s": args.new_tokens / med, "ratio_median": statistics.median(ratios),
                          "ratio_min": min(ratios), "ratio_max": max(ratios)}
            print(f"{n:<14}{med:>10.4f}{args.new_tokens / med:>10.0f}{statistics.median(ratios):>12.3f}"
                  f"{min(ratios):>8.3f}-{max(ratios):.3f}")
        sums = times
    else:
        with torch.no_grad():
            out = models["baseline"].generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                              do_sample=False)
        feed = out[0, prompt.shape[1]:]  # the continuation every contender is fed, token by token
        step_t = step_times(models, prompt, feed, args.repeats)
        sums = {n: [sum(r) for r in step_t[n]] for n in names}
        ratios = {n: [[b / t for b, t in zip(rb, rt)] for rb, rt in zip(step_t["baseline"], step_t[n])] for n in names}
        print(f"batch-1 decode, {args.new_tokens} teacher-forced steps x {args.repeats} repeats, contenders interleaved "
              f"per step, 1 thread")
        print(f"{'contender':<14}{'ms/step':>9}{'step ratio':>12}{'95% CI':>18}{'sum ratio':>11}")
        for n in names:
            ms = statistics.median(sums[n]) / args.new_tokens * 1000
            if n == "baseline":
                print(f"{n:<14}{ms:>9.3f}{1.0:>12.3f}")
                continue
            flat = [r for rep in ratios[n] for r in rep]
            lo, hi = bootstrap_ci(ratios[n])
            sum_ratio = statistics.median(b / t for b, t in zip(sums["baseline"], sums[n]))
            summary[n] = {"ms_per_step": ms, "step_ratio_median": statistics.median(flat), "ci95": [lo, hi],
                          "sum_ratio_median": sum_ratio}
            print(f"{n:<14}{ms:>9.3f}{statistics.median(flat):>12.3f}{f'[{lo:.3f}, {hi:.3f}]':>18}{sum_ratio:>11.3f}")
    extra = [s.partition("=")[0] for s in args.extra_tables]
    for a, b in zip(extra, extra[1:]):  # each extra tables file against the one before it
        if args.generate:
            r = statistics.median(x / y for x, y in zip(sums[a], sums[b]))
        else:
            r = statistics.median(x / y for ra, rb in zip(ratios[b], ratios[a]) for x, y in zip(ra, rb))
        summary[f"{b}/{a}"] = {"ratio_median": r}
        print(f"{b} / {a}: median ratio {r:.3f}")
    for w in wrappers.values():
        w.restore()
    doc = {"mode": "generate" if args.generate else "steps", "new_tokens": args.new_tokens, "repeats": args.repeats,
           "contenders": specs, "summary": summary, "sums_s": sums}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(doc, f, indent=2)
    return doc


if __name__ == "__main__":
    main()
