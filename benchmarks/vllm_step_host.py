"""VAR's per-step host work on vLLM, in one process: decode steps of --rows requests, VAR against baseline.

Builds the engine as `varmoe serve --engine vllm` does (server settings' defaults: no dtype, the
reference model and its committed tables), but with vLLM's engine core and worker in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the model runner's per-step hook (var_moe/vllm/rows.py
`_runner_prepare_inputs`: vLLM's input preparation, then the requests' modes and (previous, token)
entries) can be timed from here. Each round runs one block per mode (order alternating): --rows
greedy requests of the mode are admitted, two steps run their prompts, then --steps decode steps
are timed one by one (wall time of `LLMEngine.step()`) with the hook's own time beside them.
Reported per mode: the median step and the median hook time per step; and the VAR / baseline step
ratio per round, whose median is the headline (the machine's speed drifts between rounds; within a
round both modes run within a second). The hook time includes vLLM's own input preparation, the
same in both modes, so the difference between the modes is what VAR adds on the host.

Run (vLLM environment, from the repository root; a checkout of another commit measures that one):
    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python -m benchmarks vllm_step_host --rows 4 \
        --rounds 60 --output benchmarks/results/vllm_step_host.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4, help="requests decoding together")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per block")
    p.add_argument("--rounds", type=int, default=60, help="rounds of one block per mode")
    p.add_argument("--output", default="runs/vllm_step_host.json")
    args = p.parse_args(argv)
    if args.rows < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--rows, --steps and --rounds must be at least 1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and worker in this process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import var_moe.vllm.rows as rows

    hook = {"s": 0.0, "n": 0}
    inner = rows._runner_prepare_inputs

    def timed(self, *a, **k):  # installed in its place when the engine is built (install_rows)
        t0 = time.perf_counter()
        try:
            return inner(self, *a, **k)
        finally:
            hook["s"] += time.perf_counter() - t0
            hook["n"] += 1

    rows._runner_prepare_inputs = timed
    from vllm import SamplingParams

    from benchmarks.server_throughput import prompts
    from server.settings import ServerSettings
    from server.vllm_host import VllmHost

    host = VllmHost.load(ServerSettings(engine="vllm"))
    if not host.available:
        p.error(f"VAR is not available on this engine: {host.unavailable_reason}")
    llm, tok = host.llm, host.tokenizer
    ids = [tok(x)["input_ids"] for x in prompts(64)]
    count = iter(range(10**9))

    def block(var: bool, steps: int) -> tuple[float, float]:
        for _ in range(args.rows):
            i = next(count)
            sp = SamplingParams(max_tokens=steps + 3, temperature=0.0, detokenize=False, ignore_eos=True,
                                extra_args={rows.MODE_KEY: var})
            llm.add_request(f"r{i}", {"prompt_token_ids": ids[i % len(ids)], "cache_salt": str(var)}, sp)
        llm.step()
        llm.step()
        took = []
        hook["s"], hook["n"] = 0.0, 0
        for _ in range(steps):
            t0 = time.perf_counter()
            llm.step()
            took.append(time.perf_counter() - t0)
        per_hook = hook["s"] / max(hook["n"], 1)
        while llm.has_unfinished_requests():
            llm.step()
        return statistics.median(took), per_hook

    for _ in range(10):  # warm-up: both modes' shapes
        block(True, 5)
        block(False, 5)
    res: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(args.rounds):
        for var in ((True, False) if r % 2 == 0 else (False, True)):
            res[var].append(block(var, args.steps))
    ratio = [a[0] / b[0] for a, b in zip(res[True], res[False])]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    out = {"rows": args.rows, "steps": args.steps, "rounds": args.rounds,
           "step_ms": {m: round(med(x[0] for x in res[v]) * 1e3, 4) for m, v in (("var", True), ("baseline", False))},
           "hook_us": {m: round(med(x[1] for x in res[v]) * 1e6, 1) for m, v in (("var", True), ("baseline", False))},
           "var_over_baseline_step_per_round": [round(x, 4) for x in ratio],
           "var_over_baseline_step_median": round(med(ratio), 4)}
    out["var_hook_extra_us"] = round(out["hook_us"]["var"] - out["hook_us"]["baseline"], 1)
    for m in ("var", "baseline"):
        print(f"{m:8s} step {out['step_ms'][m]:.3f} ms, runner hook {out['hook_us'][m]:.1f} us per step")
    print(f"VAR's hook adds {out['var_hook_extra_us']:.1f} us per step; VAR / baseline step per round: median "
          f"{out['var_over_baseline_step_median']:.3f} (quartiles "
          f"{statistics.quantiles(ratio, n=4)[0]:.3f}-{statistics.quantiles(ratio, n=4)[2]:.3f})" if len(ratio) > 1
          else f"VAR / baseline step: {ratio[0]:.3f}")
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
