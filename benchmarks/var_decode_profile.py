"""Where VAR's time goes in batch-1 decoding: generate() with VAR off vs on, then a cProfile of VAR.

Greedy generation of --new-tokens tokens from one short prompt on the reference model with its
committed tables (balanced preset), 1 thread; baseline and VAR timed in the same process after a
warm-up each, then the VAR runs profiled (top functions by own time).

Run: `python benchmarks/var_decode_profile.py [--new-tokens 64] [--repeats 3]`
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from var_moe.loading import REFERENCE_MODEL_DIR, load_model
from var_moe.var.config import VARConfig
from var_moe.var.tables import VARTables
from var_moe.var.wrapper import VARModelWrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    tables = VARTables.load(f"{args.model}/var/var_tables.safetensors", model=model)
    wrapper = VARModelWrapper(model, VARConfig.from_dict(tables.metadata["config"]), tables)
    ids = tok("import os\nimport sys\n", return_tensors="pt")

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            wrapper.generate(**ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        return time.perf_counter() - t0

    times = {}
    for mode in ("baseline", "var"):
        wrapper.enable_var() if mode == "var" else wrapper.disable_var()
        run(1)  # warm-up
        times[mode] = run(args.repeats)
    print(f"batch-1 decode, {args.new_tokens} tokens x {args.repeats}: baseline {times['baseline']:.3f} s, "
          f"VAR {times['var']:.3f} s, VAR speed / baseline {times['baseline'] / times['var']:.3f}x")
    wrapper.enable_var()
    prof = cProfile.Profile()
    prof.enable()
    run(args.repeats)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    wrapper.restore()


if __name__ == "__main__":
    main()
