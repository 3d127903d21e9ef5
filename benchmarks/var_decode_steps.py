"""Batch-1 decoding, VAR vs baseline, interleaved step by step: the ratio without the machine's drift.

benchmarks/var_decode_ablation.py times whole 64-token generations one after the other; on this
machine the same work runs 0.6x-1.5x as fast from one generation to the next, so medians of 61
repeats still move by 3-4 points between runs. Here every contender is its own copy of the
reference model (the VAR ones with a `VARModelWrapper` installed for the whole run), all decoding
the SAME token sequence (the baseline's greedy continuation of the prompt, fed one token per
step, teacher-forced, each with its own KV cache), and the contenders take turns at every single
decode step (order rotated per step), so each step's times are taken within milliseconds of each
other. Reported per contender: the median over all steps of the per-step ratio baseline / contender
(> 1 = faster than baseline) with a 95% bootstrap interval over repeats, and the ratio of summed
times per repeat (median). Contenders: `baseline` (the model as loaded, nothing installed), `var`
(committed tables with their config), and one per `--extra-tables NAME=PATH` (the committed
tables' config with that file).

Run: `python benchmarks/var_decode_steps.py [--new-tokens 64] [--repeats 21] [--extra-tables NAME=PATH ...]
[--json F]`
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from var_moe.loading import REFERENCE_MODEL_DIR, load_model
from var_moe.var.config import VARConfig
from var_moe.var.tables import VARTables
from var_moe.var.wrapper import VARModelWrapper

PROMPT = "import os\nimport sys\n"


def bootstrap_ci(per_repeat: list[list[float]], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the median step ratio, resampling whole repeats."""
    rng = random.Random(seed)
    meds = []
    for _ in range(draws):
        pick = [r for _ in per_repeat for r in per_repeat[rng.randrange(len(per_repeat))]]
        meds.append(statistics.median(pick))
    meds.sort()
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--extra-tables", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.new_tokens < 1 or args.repeats < 2:
        ap.error("--new-tokens must be >= 1 and --repeats >= 2")
    torch.set_num_threads(1)
    specs = {"baseline": None, "var": f"{args.model}/var/var_tables.safetensors"}
    for spec in args.extra_tables:
        name, sep, path = spec.partition("=")
        if not sep or not name or name in specs:
            ap.error(f"--extra-tables takes NAME=PATH with a new NAME, got {spec!r}")
        specs[name] = path
    models, wrappers = {}, {}
    for name, path in specs.items():
        model, tok = load_model(args.model)
        models[name] = model
        if path is not None:
            committed = VARTables.load(specs["var"], model=model)
            config = VARConfig.from_dict(committed.metadata["config"])
            wrappers[name] = VARModelWrapper(model, config, VARTables.load(path, model=model))  # installed
    prompt = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = models["baseline"].generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                          do_sample=False)
    feed = out[0, prompt.shape[1]:]  # the continuation every contender is fed, token by token
    names = list(specs)
    ratios: dict[str, list[list[float]]] = {n: [] for n in names if n != "baseline"}
    sums: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # repeat 0 warms every contender up and is not kept
            step_t = {n: [] for n in names}
            past = {}
            for n in names:  # prefill (not timed)
                o = models[n](input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
                past[n] = o.past_key_values
            length = prompt.shape[1]
            for i in range(args.new_tokens):
                ids = feed[i].view(1, 1)
                length += 1
                mask = torch.ones(1, length, dtype=torch.long)
                k = (rep * args.new_tokens + i) % len(names)
                for n in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    o = models[n](input_ids=ids, attention_mask=mask, past_key_values=past[n], use_cache=True)
                    step_t[n].append(time.perf_counter() - t0)
                    past[n] = o.past_key_values
            if rep == 0:
                continue
            for n in names:
                sums[n].append(sum(step_t[n]))
            for n in ratios:
                ratios[n].append([b / t for b, t in zip(step_t["baseline"], step_t[n])])
    for w in wrappers.values():
        w.restore()
    summary = {}
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
    pair_names = [n for n in names if n not in ("baseline", "var")]
    for a, b in zip(pair_names, pair_names[1:]):  # each extra tables file against the one before it
        flat = [x / y for ra, rb in zip(ratios[b], ratios[a]) for x, y in zip(ra, rb)]
        summary[f"{b}/{a}"] = {"step_ratio_median": statistics.median(flat)}
        print(f"{b} / {a}: median per-step ratio {statistics.median(flat):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"new_tokens": args.new_tokens, "repeats": args.repeats, "tables": specs, "summary": summary,
                       "sums_s": sums}, f, indent=2)


if __name__ == "__main__":
    main()
