"""`make gpu-check`: the paths that need CUDA, run on the reference model, one table + JSON.

Runs every check module in `benchmarks/gpu_checks/` (each defines `run(ctx) -> list[dict]`, one
row per measured thing; see `gpu_checks/__init__.py` for the row fields) and prints one table:

- `bf16_routing`  bf16 vs fp32 routing on CUDA (exact top-k set agreement per layer), fp32 CUDA vs
                  fp32 CPU, and the Phase 1 capture in bf16 on CUDA;
- `quantized`     4-bit and 8-bit bitsandbytes loading and their perplexity next to fp32 CUDA, and
                  `device_map="auto"` loading;
- `server_cuda`   `varmoe serve --device cuda`: greedy generation and perplexity equal the same
                  model in process, VAR mode answers.
Other engineers add modules there (a vLLM engine check, ...); the runner finds them by name.

On a machine without CUDA it prints that it needs CUDA and exits 0, having run nothing.
`--device cpu` runs the checks' own code on the CPU (what the tests do; the numbers then say
nothing about CUDA, and the quantization rows are skipped). A check that raises becomes one
failed row with the error, so one broken path never hides the others. Exit status 1 when any
row failed.

Run:  make gpu-check
      python -m benchmarks gpu_check [--model DIR] [--checks bf16_routing,quantized] [--num-samples 64]
          [--output runs/gpu_check.json]
Test: `pytest tests/test_gpu_check.py`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks.gpu_checks import GPUContext, row

COLUMNS = ("check", "metric", "value", "expect", "ok", "note")


def discover(names: list[str] | None = None) -> dict[str, Any]:
    """Check modules of benchmarks/gpu_checks/ by name (all of them, sorted, when `names` is None)."""
    from benchmarks import gpu_checks

    found = sorted(m.name for m in pkgutil.iter_modules(gpu_checks.__path__) if not m.name.startswith("_"))
    if names:
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise SystemExit(f"gpu_check: unknown --checks {unknown}; available: {', '.join(found)}")
        found = [n for n in found if n in names]
    return {n: importlib.import_module(f"benchmarks.gpu_checks.{n}") for n in found}


def run_checks(modules: dict[str, Any], ctx: GPUContext, log: Callable[[str], None] = print) -> list[dict]:
    """Rows of every module in turn; an exception is a failed row naming it (the others still run)."""
    rows: list[dict] = []
    for name, module in modules.items():
        log(f"gpu-check: {name} ...")
        t0 = time.perf_counter()
        try:
            got = list(module.run(ctx))
        except Exception as exc:  # noqa: BLE001 - the table reports it; the next check still runs
            got = [row(name, "error", None, "runs", False, f"{type(exc).__name__}: {exc}"[:300])]
            (ctx.out_dir / f"{name}.traceback.txt").write_text(traceback.format_exc())
        for r in got:
            missing = set(COLUMNS) - set(r)
            if missing:
                raise ValueError(f"gpu check {name}: row {r} lacks {sorted(missing)}")
        rows.extend(got)
        log(f"gpu-check: {name}: {len(got)} rows in {time.perf_counter() - t0:.1f} s")
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """One Markdown table of all rows (ok: yes / NO / - for informational or skipped)."""
    cells = [[_cell(r[c]) if c != "ok" else {True: "yes", False: "NO", None: "-"}[r["ok"]] for c in COLUMNS]
             for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(COLUMNS)]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |" for line in cells]
    return "\n".join(out)


def summary(rows: list[dict]) -> dict:
    return {"rows": len(rows), "failed": sum(r["ok"] is False for r in rows),
            "passed": sum(r["ok"] is True for r in rows), "informational": sum(r["ok"] is None for r in rows)}


def environment(device: str) -> dict:
    import torch

    env = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("transformers", "bitsandbytes", "accelerate"):
        try:
            env[pkg] = importlib.import_module(pkg).__version__
        except ImportError:
            env[pkg] = None
    return env


def main(argv: list[str] | None = None) -> int:
    from var_moe.loading import REFERENCE_MODEL_DIR

    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    p.add_argument("--checks", default=None, help="comma-separated check modules (default: all)")
    p.add_argument("--num-samples", type=int, default=64, help="test-split sequences per measurement")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu runs the checks' own code without CUDA (for tests; says nothing about CUDA)")
    p.add_argument("--output", default="runs/gpu_check.json")
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check needs CUDA: torch sees no CUDA device here "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}). Nothing was run.")
        return 0
    torch.set_num_threads(1)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_suffix("")  # per-check files (captures, server logs, tracebacks)
    work.mkdir(parents=True, exist_ok=True)
    ctx = GPUContext(model=args.model, device=args.device, num_samples=args.num_samples, out_dir=work)
    modules = discover(args.checks.split(",") if args.checks else None)
    rows = run_checks(modules, ctx)
    print(format_table(rows))
    result = {"environment": environment(args.device), "model": args.model, "num_samples": args.num_samples,
              "checks": list(modules), "summary": summary(rows), "rows": rows}
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    s = result["summary"]
    print(f"{s['passed']} passed, {s['failed']} failed, {s['informational']} informational -> {out}")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
