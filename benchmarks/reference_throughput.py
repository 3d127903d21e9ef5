"""Training and inference throughput of the reference model on this machine.

Training: tokens/s of full optimizer steps (recipe batch x seq_len, the per-layer balancing loss
on) for each experts implementation, interleaved in rotating order (`var_moe.timing`) after a warm-up, median of repeats.
Inference: forward tokens/s at batch 8 x 256 (no KV cache), same interleaving.

Run: `python -m benchmarks reference_throughput [--model models/reference-moe] [--repeats 5] [--threads 1] [--output PATH]`
Prints a table and, with --output, writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from var_moe.corpus import iter_batches
from var_moe.loading import REFERENCE_MODEL_DIR, load_model
from var_moe.reference.recipe import Recipe
from var_moe.reference.train import per_layer_balance_loss
from var_moe.timing import Variant, interleaved

ALL_IMPLS = ("grouped_mm", "eager", "batched_mm")  # batched_mm trains ~50x slower on CPU: opt in


def train_step(model, batch, recipe, optimizer) -> None:
    out = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
    ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss = ce + recipe.balance_coef * per_layer_balance_loss(out.router_logits, recipe.num_experts_per_tok,
                                                            recipe.balance_top1_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def forward(model, ids) -> None:
    model(input_ids=ids, use_cache=False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--impls", default="grouped_mm,eager", help=f"comma-separated subset of {ALL_IMPLS}")
    ap.add_argument("--output", default=None, help="write the JSON here (committed: benchmarks/results/reference_throughput.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    impls = tuple(args.impls.split(","))
    if "grouped_mm" not in impls or not set(impls) <= set(ALL_IMPLS):
        ap.error(f"--impls must include grouped_mm and be a subset of {ALL_IMPLS}")
    recipe = Recipe.from_json((Path(args.model) / "recipe.json").read_text())
    models = {impl: load_model(args.model, experts_implementation=impl)[0] for impl in impls}
    tok = load_model(args.model)[1]
    ids = next(iter_batches(tok, "stdlib", "test", 256, 8, 8))[0]
    g = torch.Generator().manual_seed(0)
    train_batch = torch.randint(0, recipe.vocab_size, (recipe.batch_size, recipe.seq_len + 1), generator=g)
    opts = {}
    for impl, m in models.items():
        m.train()
        opts[impl] = torch.optim.AdamW(m.parameters(), lr=1e-5)
    # interleaved (rotating order) after one warm-up round: var_moe.timing
    train = interleaved({impl: Variant(lambda i, impl=impl: train_step(models[impl], train_batch, recipe, opts[impl]))
                         for impl in impls}, 1, args.repeats, warmup=1)
    for m in models.values():
        m.eval()
    fwd = interleaved({impl: Variant(lambda i, impl=impl: forward(models[impl], ids)) for impl in impls}, 1, args.repeats,
                      warmup=1)
    train_s = {impl: [t[0] for t in train[impl]] for impl in impls}
    fwd_s = {impl: [t[0] for t in fwd[impl]] for impl in impls}
    train_tokens = recipe.batch_size * recipe.seq_len
    rows = {}
    for impl in impls:
        rows[impl] = {
            "train_tokens_per_s": train_tokens / statistics.median(train_s[impl]),
            "forward_tokens_per_s": ids.numel() / statistics.median(fwd_s[impl]),
            "train_vs_grouped_mm": statistics.median(a / b for a, b in zip(train_s[impl], train_s["grouped_mm"])),
        }
    print(f"threads={args.threads} repeats={args.repeats} train batch {recipe.batch_size}x{recipe.seq_len}, forward batch 8x256")
    print(f"{'experts impl':<12} {'train tok/s':>12} {'forward tok/s':>14} {'train time / grouped_mm':>24}")
    for impl, r in rows.items():
        print(f"{impl:<12} {r['train_tokens_per_s']:>12,.0f} {r['forward_tokens_per_s']:>14,.0f} {r['train_vs_grouped_mm']:>24.2f}")
    if not args.output:
        return
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
