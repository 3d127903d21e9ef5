"""Speed of the expert-cache simulator: a million token-layer events per policy, compiled vs plain Python.

    python -m benchmarks offload_simulator --trace results/offload/trace_test.parquet \
        [--events 1000000 --python-events 64000 --repeats 5] [--output benchmarks/results/offload_simulator.json]

The trace is mapped onto Mixtral-8x7B's 32 layers and cut to `--events` token-layer events. For
every policy the compiled loop runs `--repeats` times after a warm-up (compilation excluded, as a
served process compiles once); on a `--python-events` slice the compiled and the plain-Python loop
run interleaved and the ratio of their medians is reported. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default="results/offload/trace_test.parquet")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--python-events", type=int, default=64_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    from var_moe.offload import kernel
    from var_moe.offload.hardware import MIXTRAL_8X7B, get_profile
    from var_moe.offload.predictors import all_predictions
    from var_moe.offload.simulator import POLICIES_ALL, SimConfig, map_predictions, next_use, simulate
    from var_moe.offload.trace import Trace
    from var_moe.timing import Variant, interleaved

    src = Trace.read(a.trace)
    layers = MIXTRAL_8X7B.num_layers
    tables = Path("models/reference-moe/var/var_tables.safetensors")
    preds_src = all_predictions(src, tables if tables.exists() else None)
    cfg, prof = SimConfig(cache_size=4), get_profile("rtx3060")

    def cut(n_tokens: int):
        tr = src.slice_tokens(n_tokens).map_layers(layers)
        pr = map_predictions({k: v[:n_tokens] for k, v in preds_src.items()}, src.num_layers, layers)
        return tr, pr

    big_tr, big_pr = cut(a.events // layers)
    small_tr, small_pr = cut(a.python_events // layers)
    rows = []
    for policy in POLICIES_ALL:
        nu_big = next_use(big_tr.experts_TLK, big_tr.num_experts) if policy == "oracle" else None
        nu_small = next_use(small_tr.experts_TLK, small_tr.num_experts) if policy == "oracle" else None
        simulate(small_tr, small_pr, cfg, prof, MIXTRAL_8X7B, policy, compiled=True)  # warm-up / compile
        big = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            simulate(big_tr, big_pr, cfg, prof, MIXTRAL_8X7B, policy, compiled=True, next_use_TLK=nu_big)
            big.append(time.perf_counter() - t0)
        small = {name: Variant(lambda i, c=c: simulate(small_tr, small_pr, cfg, prof, MIXTRAL_8X7B, policy, compiled=c,
                                                       next_use_TLK=nu_small))
                 for name, c in (("compiled", True), ("python", False))}
        times = interleaved(small, 1, a.repeats, warmup=0)  # rotating which goes first (var_moe.timing)
        comp, py = [t[0] for t in times["compiled"]], [t[0] for t in times["python"]]
        rows.append({"policy": policy, "events": big_tr.num_tokens * layers, "compiled_s": statistics.median(big),
                     "small_events": small_tr.num_tokens * layers, "small_compiled_s": statistics.median(comp),
                     "small_python_s": statistics.median(py),
                     "python_over_compiled": statistics.median(py) / statistics.median(comp)})
    print(f"compiled helper: {'numba' if kernel.compiled() else 'none (plain Python)'}")
    print(f"{'policy':<12}{'events':>10}{'compiled s':>12}{'Mevents/s':>11}{'py events':>11}{'python s':>10}{'py/compiled':>13}")
    for r in rows:
        print(f"{r['policy']:<12}{r['events']:>10}{r['compiled_s']:>12.3f}{r['events'] / r['compiled_s'] / 1e6:>11.2f}"
              f"{r['small_events']:>11}{r['small_python_s']:>10.2f}{r['python_over_compiled']:>13.0f}")
    doc = {"trace": a.trace, "repeats": a.repeats, "compiled": kernel.compiled(), "rows": rows,
           "command": "python -m benchmarks offload_simulator " + " ".join(argv or [])}
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc


if __name__ == "__main__":
    main()
