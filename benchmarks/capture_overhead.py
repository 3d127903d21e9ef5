"""Capture overhead: RouterAnalyzer forward vs a plain forward over the same batches, and peak memory.

    python -m benchmarks capture_overhead [--model DIR] [--batches 8] [--repeats 5] [--threads 1] [--output PATH]

Throughput: the same padded batches go through `model(...)` under no_grad (plain) and through
`RouterAnalyzer.analyze_batch` (capture: hooks + all statistics + pair table), interleaved batch by
batch (each batch plain and captured back to back, the order rotating: `var_moe.timing`) after a warm-up; reported:
the ratio of the median pass times, the median of the per-batch paired ratios (robust to load from
other processes), and the share of the capture time spent inside the statistics hooks. Memory: two fresh subprocesses capture a small and a
4x larger corpus and report their peak resident memory (CUDA: peak allocated) and the size of the
statistics state; flat memory means the state does not grow with tokens.

Uses the reference model when it exists, otherwise a toy model (stated in the output). Writes the JSON
to --output and replaces the "## Capture" section of docs/BENCHMARKS.md (unless --no-docs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from var_moe.capture.analyzer import RouterAnalyzer
from var_moe.corpus import iter_batches
from var_moe.loading import REFERENCE_MODEL_DIR, load_model
from var_moe.timing import Variant, interleaved

ROOT = Path(__file__).resolve().parent.parent


def pick_model(arg: str | None) -> tuple[str, str, str]:
    """(model_dir, dataset, description)."""
    if arg:
        return arg, "stdlib", arg
    if (REFERENCE_MODEL_DIR / "config.json").exists():
        return str(REFERENCE_MODEL_DIR), "stdlib", "reference model"
    from var_moe.capture.toy import make_toy_setup

    root = Path(tempfile.mkdtemp(prefix="varmoe-bench-"))
    model_dir, corpus = make_toy_setup(root, num_docs=200)
    return str(model_dir), str(corpus), "TOY model (reference model not found): tiny Mixtral, hidden 32, 4 experts"


def get_batches(tok, dataset: str, n: int, batch_size: int, max_length: int):
    it = iter_batches(tok, dataset, "train" if dataset != "stdlib" else "test", max_length, batch_size, None)
    out = []
    for ids, mask in it:
        if len(out) == n:
            break
        if ids.shape[0] == batch_size:
            out.append((ids, mask))
    return out


def time_pass(fn, batches) -> float:
    start = time.perf_counter()
    for ids, mask in batches:
        fn(ids, mask)
    return time.perf_counter() - start


def throughput(model_dir: str, dataset: str, args) -> dict:
    model, tok = load_model(model_dir, device=args.device)
    batches = get_batches(tok, dataset, args.batches, args.batch_size, args.max_length)
    device = next(model.parameters()).device
    batches = [(i.to(device), m.to(device)) for i, m in batches]
    tokens = sum(int(m.sum()) for _, m in batches)
    analyzer = RouterAnalyzer(model, tokenizer=tok)

    @torch.no_grad()
    def plain(ids, mask):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def capture(ids, mask):
        analyzer.analyze_batch(ids, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()

    hook_s = [0.0]
    inner = analyzer._on_router

    def timed_hook(*a):  # time spent inside the statistics hook, for the cost breakdown
        t0 = time.perf_counter()
        inner(*a)
        hook_s[0] += time.perf_counter() - t0

    analyzer.recorder.callback = timed_hook
    time_pass(plain, batches[:2])
    time_pass(capture, batches[:2])
    hook_s[0] = 0.0
    # paired design: each batch runs plain and captured back to back (order rotating), so load from
    # other processes hits both sides of a pair alike
    times = interleaved({"plain": Variant(lambda i: plain(*batches[i])), "capture": Variant(lambda i: capture(*batches[i]))},
                        len(batches), args.repeats, warmup=0, device=device)
    plain_s, capture_s = [sum(t) for t in times["plain"]], [sum(t) for t in times["capture"]]
    ratios = [c / p for tp, tc in zip(times["plain"], times["capture"]) for p, c in zip(tp, tc)]
    p, c = statistics.median(plain_s), statistics.median(capture_s)
    return {
        "tokens_per_pass": tokens, "batches": len(batches), "batch_size": args.batch_size, "max_length": args.max_length,
        "plain_s": plain_s, "capture_s": capture_s, "plain_tokens_per_s": tokens / p, "capture_tokens_per_s": tokens / c,
        "overhead_pct": 100 * (c / p - 1),
        "paired_median_overhead_pct": 100 * (statistics.median(ratios) - 1),
        "hook_share_of_capture_pct": 100 * hook_s[0] / sum(capture_s),
    }


def memory_probe(model_dir: str, dataset: str, n: int, args) -> dict:
    """Run in a fresh process: capture n batches, report peak memory and the state's size."""
    model, tok = load_model(model_dir, device=args.device)
    analyzer = RouterAnalyzer(model, tokenizer=tok)
    tokens = 0
    for ids, mask in get_batches(tok, dataset, n, args.batch_size, args.max_length):
        analyzer.analyze_batch(ids, mask)
        tokens += int(mask.sum())
    analyzer.pairs.flush()
    state = analyzer.stats.nbytes()
    pair_bytes = sum(t.numel() * 8 * 3 for t in analyzer.pairs.keys)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() and args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"batches": n, "tokens": tokens, "peak_bytes": peak, "stats_state_bytes": state, "pair_table_bytes": pair_bytes}


def markdown(res: dict) -> str:
    t = res["throughput"]
    m = res["memory"]
    lines = [
        "## Capture",
        "",
        f"Command: `{res['command']}`  ",
        f"Model: {res['model']}; device {res['device']}; {res['machine']}; torch {torch.__version__}.  ",
        f"{t['batches']} batches of {t['batch_size']} x {t['max_length']} ({t['tokens_per_pass']} valid tokens) per pass, "
        f"{len(t['plain_s'])} interleaved repeats, medians:",
        "",
        "| pass | tokens/s |",
        "|---|---|",
        f"| plain forward | {t['plain_tokens_per_s']:.0f} |",
        f"| forward + capture (stats + pairs) | {t['capture_tokens_per_s']:.0f} |",
        f"| overhead, ratio of pass medians | {t['overhead_pct']:+.1f}% (goal <= 5%) |",
        f"| overhead, median of per-batch paired ratios | {t['paired_median_overhead_pct']:+.1f}% |",
        f"| time inside the statistics hooks | {t['hook_share_of_capture_pct']:.1f}% of the capture pass |",
        "",
        "| corpus | tokens | peak memory | statistics state | pair table |",
        "|---|---|---|---|---|",
    ]
    for row in m:
        lines.append(f"| {row['batches']} batches | {row['tokens']} | {row['peak_bytes'] / 2**20:.1f} MiB | "
                     f"{row['stats_state_bytes'] / 2**20:.2f} MiB | {row['pair_table_bytes'] / 2**20:.2f} MiB |")
    lines += [
        "",
        "Peak memory is the whole process (model, torch, tokenizer); the statistics state is fixed at",
        "L x V x (E-sized counts + top-k set counts) and does not grow with tokens. The pair table grows",
        "with the number of distinct (previous, token) pairs seen, up to its capacity (default 2M keys per",
        "layer, 48 MiB), after which lossy counting keeps it bounded. "
        f"Load average during the run: {res['load_average']}.",
        "",
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find("## Capture\n")
    if start >= 0:  # replace only our own section
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None, help="write the JSON here (committed: benchmarks/results/capture_overhead.json)")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/BENCHMARKS.md")
    p.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args.model, args.dataset, args.memory_probe, args)))
        return 0
    model_dir, dataset, desc = pick_model(args.model)
    res = {"model": desc, "device": args.device, "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s)",
           "command": " ".join(["python -m benchmarks capture_overhead", *(sys.argv[1:] if argv is None else argv)])}
    res["throughput"] = throughput(model_dir, dataset, args)
    res["load_average"] = " / ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"
    res["memory"] = []
    for n in (max(1, args.batches // 2), 2 * args.batches):
        cmd = [sys.executable, "-m", "benchmarks", "capture_overhead", "--memory-probe", str(n), "--model", model_dir, "--dataset", dataset,
               "--device", args.device, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip().splitlines()[-1]
        res["memory"].append(json.loads(out))
    section = markdown(res)
    print(section)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=2))
    if not args.no_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
