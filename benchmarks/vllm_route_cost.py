"""What VAR's per-layer work costs inside an inductor-compiled graph on the CPU, by part.

vLLM compiles the model (on the CPU with inductor), and VAR's routing, its counters and the expert
load run inside that graph, once per MoE layer per step. Served comparisons through HTTP on a
2-core machine swing by more than these parts cost, so this times them apart, in one process: a
stand-in MoE forward (per layer: a router linear, softmax, top-k, and a residual that uses the
chosen weights and experts, so nothing is dead code) compiled as vLLM's CPU build compiles the model
(`compile_options`: inference mode, static buffer shapes with the token dimension marked dynamic,
vLLM's inductor options, guards dropped) in five variants, each calling the real code of
var_moe/vllm:
- `plain`: no VAR;
- `route`: `LayerVar.route` (table gathers, the row mode, selects, the set audit and counters);
- `route+routed`: plus the routed-experts rows (`VllmLoad` with counting off, as
  `--no-expert-load-metrics` builds it);
- `route+count`: plus the expert-load counters (the default build);
- `route+count+pairs`: plus a (previous, token) pair tier of `--pair-capacity` slots.
With `--against DIR` (a folder holding another commit's `var_moe/`, e.g. from `git archive`), two
more variants run that commit's code: `route+routed@against` and `route+count@against`, so a change
to VAR's in-graph work is measured before and after in one process (their counters are checked
equal to this tree's after the warm-up).
Variants alternate in blocks (order reversed every other block); each block times `--calls`
forwards with the thread's CPU clock (`time.thread_time`, one torch thread), and the median per
variant over `--blocks` blocks is reported with its difference to `plain`, per step and per layer.

Run (vLLM environment, for its torch; vLLM itself is not started):
    HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m benchmarks vllm_route_cost --rows 4 \
        --output benchmarks/results/vllm_route_cost.json
    mkdir -p /tmp/before && git archive COMMIT var_moe | tar -x -C /tmp/before   # then --against /tmp/before
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch


# what vLLM's CPU build passes to inductor (vllm/platforms/cpu.py), and its dropping of all guards
# (vllm/compilation/wrapper.py): with guards kept, every call re-checks each tensor VAR reads
COMPILE_OPTIONS = {"dce": True, "size_asserts": False, "nan_asserts": False, "epilogue_fusion": True,
                   "cpp.dynamic_threads": True}


def compile_options() -> dict:
    return {**COMPILE_OPTIONS, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}


VARIANTS = {"plain": (False, None, 0), "route": (True, None, 0), "route+routed": (True, False, 0),
            "route+count": (True, True, 0), "route+count+pairs": (True, True, 1)}


def against_package(folder: str) -> str:
    """Import another commit's `var_moe/` under the name `var_moe_against` (its imports are relative)."""
    src = Path(folder) / "var_moe"
    if not (src / "vllm" / "routing.py").is_file():
        raise SystemExit(f"--against {folder}: no var_moe/vllm/routing.py there (extract a commit's var_moe/ into it)")
    root = Path(tempfile.mkdtemp(prefix="route_cost_"))
    shutil.copytree(src, root / "var_moe_against", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(root))
    return "var_moe_against"


def build(args, var: bool, counting: bool | None, pairs: bool, pkg: str = "var_moe"):
    routing = importlib.import_module(f"{pkg}.vllm.routing")
    load = importlib.import_module(f"{pkg}.vllm.expert_load")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the linears' weights: every variant routes the same rows alike
    v, e, k, layers = args.vocab, args.experts, args.top_k, args.layers
    state = routing.VarState(torch.device("cpu"), args.max_tokens, args.pair_capacity if pairs else 0, k, layers, v)
    lvs = []
    for s in range(layers):
        state.experts_SVK[s] = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(v)])
        state.weights_SVK[s] = torch.rand(v, k, generator=g)
        state.member_SV[s] = torch.rand(v, generator=g) < 0.3
        lv = routing.LayerVar(s, torch.nn.Linear(args.hidden, e), renormalize=True, num_experts=e, weight_scale=1.0, slot=s)
        state.layers[s] = lv
        lvs.append(lv)
    if counting is not None:
        load.install_load(state, e, k, counting=counting)
        state.load.valid_N[: args.rows] = True
    state.rows_N[: args.rows] = True  # every row in VAR mode: the whole decision runs
    gates = [torch.nn.Linear(args.hidden, e, bias=False) for _ in range(layers)]

    def forward(x, ids):
        for s in range(layers):
            logits = gates[s](x)
            w, idx = torch.softmax(logits.float(), -1).topk(k, -1)
            if var:
                w, idx = lvs[s].route(state, ids, w, idx, logits)
            x = x + (w.sum(-1, keepdim=True) * idx.float().sum(-1, keepdim=True)) * 1e-3
        return x

    # a code object of its own per variant: with guards dropped, variants sharing one would all run
    # the first variant's graph
    tag = f"forward_{int(var)}_{counting}_{int(pairs)}_{pkg}"
    fwd = types.FunctionType(forward.__code__.replace(co_name=tag), forward.__globals__, tag, None, forward.__closure__)
    compiled = torch.compile(fwd, dynamic=False, fullgraph=True, options=compile_options())
    compiled.state = state
    return compiled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4, help="token rows per step (decode steps: one per running request)")
    p.add_argument("--layers", type=int, default=4, help="MoE layers (the reference model has 4)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=2048, help="row-buffer slots (max_num_batched_tokens)")
    p.add_argument("--pair-capacity", type=int, default=4096)
    p.add_argument("--blocks", type=int, default=30)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--against", default="", metavar="DIR",
                   help="a folder holding another commit's var_moe/: adds its route+routed and route+count variants")
    p.add_argument("--output", default="runs/vllm_route_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with torch.inference_mode():  # as vLLM runs the model
        return _run(args)


def _run(args) -> int:
    fns = {name: build(args, *spec) for name, spec in VARIANTS.items()}
    if args.against:
        pkg = against_package(args.against)
        for name in ("route+routed", "route+count"):
            fns[f"{name}@against"] = build(args, *VARIANTS[name], pkg=pkg)
    x, ids = torch.randn(args.rows, args.hidden), torch.randint(0, args.vocab, (args.rows,))
    torch._dynamo.mark_dynamic(x, 0)  # the token dimension, as vLLM marks it
    torch._dynamo.mark_dynamic(ids, 0)
    for f in fns.values():  # compile and warm up
        for _ in range(20):
            f(x, ids)
    if args.against:  # the same calls must have counted the same in both codes
        mine, theirs = fns["route+count"].state.load.counter.read(), fns["route+count@against"].state.load.counter.read()
        for field in ("counts_LE", "tokens_L", "tier_counts_XLE"):
            if not (getattr(mine, field) == getattr(theirs, field)).all():
                raise SystemExit(f"--against: {field} differs between the two codes after the same calls")
    times = {n: [] for n in fns}
    names = list(fns)
    for block in range(args.blocks):
        for n in names if block % 2 == 0 else names[::-1]:
            t0 = time.thread_time()
            for _ in range(args.calls):
                fns[n](x, ids)
            times[n].append((time.thread_time() - t0) / args.calls * 1e6)
    med = {n: statistics.median(v) for n, v in times.items()}
    base = med["plain"]
    result = {"args": vars(args), "torch": torch.__version__, "compile": dict(COMPILE_OPTIONS, guards="dropped", mode="inference"),
              "median_us_per_step": med,
              "added_us_per_step": {n: med[n] - base for n in med},
              "added_us_per_layer": {n: (med[n] - base) / args.layers for n in med},
              "spread_us": {n: [min(v), max(v)] for n, v in times.items()}}
    if args.against:
        result["counting_us_per_step"] = {"this tree": med["route+count"] - med["route+routed"],
                                          "against": med["route+count@against"] - med["route+routed@against"]}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.rows} rows, {args.layers} MoE layers, {args.experts} experts top-{args.top_k}; thread CPU per step")
    for n in med:
        print(f"{n:18s} {med[n]:8.1f} us  (+{med[n] - base:6.1f} us per step, +{(med[n] - base) / args.layers:5.1f} per layer)")
    if args.against:
        c = result["counting_us_per_step"]
        print(f"expert-load counting (route+count - route+routed): this tree {c['this tree']:.1f} us, "
              f"--against {c['against']:.1f} us per step")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
