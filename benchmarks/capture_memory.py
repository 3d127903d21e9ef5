"""Capture statistics at today's MoE shapes: memory and update rate of the sparse accumulator.

Synthetic routing (Zipf-distributed token ids; per-layer expert skew plus a per-token preference
for K experts, so tokens have favourite experts as trained routers do) is fed to
`StreamingTokenStats.update_layers` at the shapes of `var_moe.shapes.SHAPES` (Mixtral-8x7B,
OLMoE, Qwen3-30B-A3B, GPT-OSS-120B, DeepSeek-V3, Kimi-K2). Each shape runs in its own process so
its peak resident memory is its own. At Mixtral's shape the dense (L x V x E) accumulator
(`DenseTokenStats`) runs in the same process, interleaved update by update with the sparse one on
the same batches, and the ratio of their median update times is reported.

Run:   python -m benchmarks capture_memory [--updates 20] [--tokens 2048] [--output PATH]
Prints a table and writes JSON (default benchmarks/results/capture_memory.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from var_moe.capture.dense_stats import DenseTokenStats
from var_moe.capture.streaming_stats import StreamingTokenStats
from var_moe.shapes import SHAPES


def synthetic_batch(g: torch.Generator, L: int, V: int, E: int, K: int, T: int):
    """(ids_T, probs_LTE, idx_LTK, w_LTK) of one forward with skewed, token-dependent routing."""
    u = torch.rand(T, generator=g, dtype=torch.float64)
    a = 0.1  # rank density ~ r**-(1 + a): Zipf exponent 1.1, inverse CDF truncated to [1, V]
    ids_T = ((1.0 - u * (1.0 - float(V) ** -a)) ** (-1.0 / a)).floor().long().clamp(1, V) - 1
    ids_T = (ids_T * 2654435761) % V  # frequent ids spread over the vocabulary
    logits = torch.randn(L, T, E, generator=g) + torch.linspace(0.0, 2.0, E)  # skewed experts
    layer_L1 = torch.arange(L)[:, None, None]
    pref = (ids_T[None, :, None] * 40503 + layer_L1 * 97 + torch.arange(K)[None, None, :] * 7919) % E
    logits.scatter_add_(2, pref.expand(L, T, K), torch.full((L, T, K), 3.0))
    probs = logits.softmax(dim=2)
    w, idx = probs.topk(K, dim=2)
    return ids_T, probs, idx, w / w.sum(dim=2, keepdim=True)


def run_one(name: str, updates: int, tokens: int, dense: bool, seed: int = 0) -> dict:
    torch.set_num_threads(1)
    s = SHAPES[name]
    L, V, E, K = s.moe_layers, s.vocab, s.experts, s.top_k
    accs = {"sparse": StreamingTokenStats(L, V, E, K)}
    if dense:
        accs["dense"] = DenseTokenStats(L, V, E, K)
    g = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {k: [] for k in accs}
    warmup = 2
    for step in range(warmup + updates):
        batch = synthetic_batch(g, L, V, E, K, tokens)
        order = list(accs) if step % 2 == 0 else list(accs)[::-1]  # alternate who goes first
        for key in order:
            t0 = time.perf_counter()
            accs[key].update_layers(range(L), *batch)
            if step >= warmup:
                times[key].append(time.perf_counter() - t0)
    out = {"shape": name, "layers": L, "experts": E, "top_k": K, "vocab": V, "tokens_per_update": tokens,
           "updates": updates, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for key, acc in accs.items():
        med = statistics.median(times[key])
        nbytes = acc.nbytes() if key == "sparse" else sum(t.numel() * t.element_size() for t in acc.tensors.values())
        out[key] = {"median_update_s": med, "updates_per_s": 1.0 / med, "tokens_per_s": tokens / med,
                    "state_mb": nbytes / 2**20}
    out["sparse"]["cells"] = len(accs["sparse"].cells)
    out["sparse"]["set_entries"] = len(accs["sparse"].sets)
    out["dense_state_mb_analytic"] = L * V * E * 24 / 2**20
    if dense:
        out["sparse_over_dense_update_rate"] = out["sparse"]["updates_per_s"] / out["dense"]["updates_per_s"]
        # early updates add many new cells (index growth); later ones mostly find their cells
        h = len(times["dense"]) // 2
        for part, sl in (("first_half", slice(0, h)), ("second_half", slice(h, None))):
            out[f"sparse_over_dense_{part}"] = statistics.median(times["dense"][sl]) / statistics.median(times["sparse"][sl])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=20, help="timed updates per shape (after 2 warm-up updates)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per update (one forward of 8 x 256)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--output", default="benchmarks/results/capture_memory.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one shape
    ap.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.updates, args.tokens, args.dense)))
        return 0
    rows = []
    for name in args.shapes:
        cmd = [sys.executable, "-m", "benchmarks.capture_memory", "--one", name, "--updates", str(args.updates),
               "--tokens", str(args.tokens)] + (["--dense"] if name == "mixtral-8x7b" else [])
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'shape':<15}{'L':>4}{'E':>5}{'k':>3}{'V':>8}  {'updates/s':>9}  {'tokens/s':>9}  {'state MB':>9}  "
          f"{'cells':>9}  {'peak RSS MB':>11}  {'dense cells MB':>14}")
    for r in rows:
        s = r["sparse"]
        print(f"{r['shape']:<15}{r['layers']:>4}{r['experts']:>5}{r['top_k']:>3}{r['vocab']:>8}  "
              f"{s['updates_per_s']:>9.1f}  {s['tokens_per_s']:>9.0f}  {s['state_mb']:>9.1f}  {s['cells']:>9}  "
              f"{r['peak_rss_mb']:>11.0f}  {r['dense_state_mb_analytic']:>14.0f}")
        if "dense" in r:
            d = r["dense"]
            print(f"{'  dense, same run':<33}  {d['updates_per_s']:>9.1f}  {d['tokens_per_s']:>9.0f}  "
                  f"{d['state_mb']:>9.1f}   sparse/dense update rate {r['sparse_over_dense_update_rate']:.2f}x "
                  f"(first half of the updates {r['sparse_over_dense_first_half']:.2f}x, "
                  f"second half {r['sparse_over_dense_second_half']:.2f}x)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
