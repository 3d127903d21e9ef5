"""What adaptive k saves: VAR with and without adaptive k, interleaved in one process on the same
batches (cache off in both, so the only difference is the single-expert tokens).

    python -m benchmarks.var_adaptive_k [--tables results/phase2/tables_aggressive.safetensors] \
        [--min-weight 0.7] [--num-samples 64] [--repeats 3] [--output results/phase2/adaptive_k_timing.json]

Also times the unmodified model in the same loop. Reports median seconds per pass and the ratios,
plus the share of (token, layer) decisions that used one expert.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tables", default="results/phase2/tables_aggressive.safetensors")
    p.add_argument("--preset", default="aggressive")
    p.add_argument("--min-weight", type=float, default=0.7)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--experts-implementation", default=None, help="eager | grouped_mm | batched_mm (default: the model's)")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from var_moe.loading import LoadSpec, load_model
    from var_moe.var.config import get_preset
    from var_moe.var.evaluate import eval_batches
    from var_moe.var.tables import VARTables
    from var_moe.var.wrapper import VARModelWrapper

    spec = LoadSpec(**({"path": a.model} if a.model else {}), experts_implementation=a.experts_implementation)
    model, tok = load_model(spec)
    batches = eval_batches(tok, "stdlib", "test", a.num_samples, 256, 8)
    tables = VARTables.load(a.tables, model)
    base_cfg = get_preset(a.preset)
    variants = {"var": VARModelWrapper(model, base_cfg, tables=tables)}
    variants["var"].restore()
    variants["var_adaptive_k"] = VARModelWrapper(model, base_cfg.replace(adaptive_k=True, adaptive_k_min_weight=a.min_weight), tables=tables)
    variants["var_adaptive_k"].restore()
    names = ["baseline", "var", "var_adaptive_k"]
    times = {n: [] for n in names}
    with torch.no_grad():
        for r in range(a.repeats + 1):  # repeat 0 is the warm-up
            per = {n: 0.0 for n in names}
            for i, b in enumerate(batches):
                order = names[(r + i) % 3:] + names[: (r + i) % 3]
                for n in order:
                    w = variants.get(n)
                    if w is not None:
                        w.install()
                    t0 = time.perf_counter()
                    model(input_ids=b.ids, attention_mask=b.mask)
                    per[n] += time.perf_counter() - t0
                    if w is not None:
                        w.restore()
            if r:
                for n in names:
                    times[n].append(per[n])
    med = {n: statistics.median(v) for n, v in times.items()}
    ov = variants["var_adaptive_k"].get_performance_stats()["overall"]
    result = {
        "tables": a.tables, "preset": a.preset, "adaptive_k_min_weight": a.min_weight, "num_samples": a.num_samples,
        "repeats": a.repeats, "threads": a.threads, "experts_implementation": model.config._experts_implementation,
        "median_s_per_pass": med, "seconds_per_pass": times,
        "speedup_adaptive_vs_var": med["var"] / med["var_adaptive_k"],
        "speedup_adaptive_vs_baseline": med["baseline"] / med["var_adaptive_k"],
        "speedup_var_vs_baseline": med["baseline"] / med["var"],
        "one_expert_share_of_decisions": ov["adaptive_single"] / max(ov["calls"], 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "seconds_per_pass"}, indent=2))
    if a.output:
        Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
