"""In-process cost of the builtin engine's expert-load counting: a decode step of a batch of --batch
rows (the server's `BatchDecoder`, KV cache, greedy) with the counting hooks (var_moe/routing_tap.py,
as `varmoe serve` installs them on the VAR-wrapped reference model) against the same step without.

The server-level comparison (benchmarks/expert_load_overhead.py) drowns a 1% effect in the noise of
a shared machine, so this measures the two parts of the cost apart, in one process:
- the hooks (their Python calls and the filing of each forward's router outputs): decode steps
  alternate hooks on / off in an ABBA pattern (attach / detach between steps, untimed), and the
  ratio of the median on-step to the median off-step is taken per block of --steps steps;
- the deferred counting: the time of one `flush()` of `RoutingTap.flush_forwards` filed steps,
  divided by that number (what each step pays for it, amortised).
Times are the CPU time of the benchmark's thread (`time.thread_time`; torch runs on it with one
thread), not wall time: on a shared machine other processes' time slices swung wall-clock steps by
+-15%, which hid a 1% effect. Reported: tokens/s on / off = off step / (on step + flush share), per
block, median and spread.

Run: .venv/bin/python -m benchmarks expert_load_step --blocks 20 --output benchmarks/results/expert_load_step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from server.decode import BatchDecoder
from server.jobs import RowSpec
from var_moe.loading import REFERENCE_MODEL_DIR, load_model
from var_moe.routing_tap import RoutingTap
from var_moe.var import VARModelWrapper, VARTables  # noqa: E402


# CPU time of this thread (torch runs on it with --threads 1): what other processes on a shared
# machine take from it in wall time does not count, which leaves the work itself to compare
CLOCK = time.thread_time


def block(model, rows: list[RowSpec], pad: int, steps: int, tap: RoutingTap) -> tuple[float, float]:
    """Median seconds per decode step with the hooks and without, steps alternating ABBA."""
    dec = BatchDecoder(model, rows, pad, None)
    dec.prefill()
    on, off = [], []
    for i in range(steps):
        hooks = (i % 4) in (0, 3)
        tap.attach() if hooks else tap.detach()
        t0 = CLOCK()
        dec.step()
        (on if hooks else off).append(CLOCK() - t0)
    tap.detach()
    return statistics.median(on), statistics.median(off)


def flush_share(model, rows: list[RowSpec], pad: int, tap: RoutingTap) -> float:
    """Seconds of one flush of `flush_forwards` filed decode steps, per step."""
    n = tap.flush_forwards
    saved, tap.flush_forwards = n, 10**9
    dec = BatchDecoder(model, rows, pad, None)
    dec.prefill()
    tap.flush()
    tap.attach()
    for _ in range(n):
        dec.step()
    t0 = CLOCK()
    tap.flush()
    took = CLOCK() - t0
    tap.detach()
    tap.flush_forwards = saved
    return took / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=32, help="decode steps per block (half with the hooks)")
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--var", action=argparse.BooleanOptionalAction, default=True, help="VAR mode (as served)")
    p.add_argument("--output", default="runs/expert_load_step.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype="float32")
    tables = Path(args.model) / "var" / "var_tables.safetensors"
    wrapper = None
    if args.var and tables.exists():
        t = VARTables.load(tables, model=model)
        from var_moe.var import VARConfig

        wrapper = VARModelWrapper(model, VARConfig.from_dict(t.metadata["config"]) if t.metadata.get("config")
                                  else None, t)
        wrapper.enable_var()
    files = sorted(Path(__file__).resolve().parent.parent.joinpath("var_moe").rglob("*.py"))
    texts = [f.read_text()[:200] for f in files[: args.batch]]
    rows = [RowSpec(tok(x)["input_ids"][:48], max_new_tokens=args.steps + 2) for x in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    tap = RoutingTap.for_wrapper(model, wrapper)  # as the server builds it: per-tier counting in VAR mode
    block(model, copy.deepcopy(rows), pad, 8, tap)  # warm-up
    long_rows = [RowSpec(r.prompt_ids, max_new_tokens=tap.flush_forwards + 2) for r in rows]
    on, off, flush, ratios = [], [], [], []
    for i in range(args.blocks):
        t_on, t_off = block(model, copy.deepcopy(rows), pad, args.steps, tap)
        f = flush_share(model, copy.deepcopy(long_rows), pad, tap) if i % 4 == 0 else flush[-1]
        on.append(t_on)
        off.append(t_off)
        flush.append(f)
        ratios.append(t_off / (t_on + f))
        print(f"block {i:2d}: step with hooks {t_on * 1e3:7.3f} ms, without {t_off * 1e3:7.3f} ms, counting "
              f"{f * 1e3:6.3f} ms/step; on/off tokens/s {ratios[-1]:.4f}", flush=True)
    res = {"model": args.model, "batch": args.batch, "steps_per_block": args.steps, "blocks": args.blocks,
           "threads": args.threads, "var": args.var, "flush_forwards": tap.flush_forwards,
           "step_ms_hooks": [round(x * 1e3, 4) for x in on], "step_ms_no_hooks": [round(x * 1e3, 4) for x in off],
           "counting_ms_per_step": [round(x * 1e3, 4) for x in flush],
           "ratio_on_off_per_block": [round(r, 4) for r in ratios],
           "ratio_median": statistics.median(ratios), "ratio_q25_q75": statistics.quantiles(ratios, n=4)[::2],
           "ratio_min": min(ratios), "ratio_max": max(ratios), "goal": 0.99}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"on/off tokens/s per block: median {res['ratio_median']:.4f}, quartiles "
          f"{res['ratio_q25_q75'][0]:.4f}-{res['ratio_q25_q75'][1]:.4f}, range {res['ratio_min']:.4f}-"
          f"{res['ratio_max']:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
