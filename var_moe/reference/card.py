"""Evaluate a trained reference model and write its folder: weights, tokenizer, card.json, MODEL_CARD.md.

`measure(model, tokenizer, recipe)` computes the numbers the card reports (held-out test
perplexity, unigram baseline on the same targets, per-layer expert load on the test split, forward
cost shares); `write_model_folder(...)` saves everything under `models/reference-moe/`.
Run through `varmoe train-reference` (which calls it after training) or
`varmoe train-reference --card-only` to re-measure a finished run. Test: `pytest tests/test_reference_model.py`.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from ..capture.recorder import RoutingRecorder
from ..corpus import iter_batches
from ..perplexity import corpus_perplexity, unigram_counts, unigram_perplexity
from ..profiling import forward_cost_shares
from .recipe import Recipe

QUALITY_MAX_PPL_RATIO = 1 / 3  # test perplexity must be at most a third of the unigram baseline's
QUALITY_MIN_EXPERT_SHARE = 0.03  # every expert of every layer gets at least 3% of top-1 choices


@torch.no_grad()
def expert_load(model: Any, tokenizer: Any, split: str = "test", max_length: int = 256, batch_size: int = 8,
                num_samples: int | None = None) -> dict[str, Any]:
    """Per-layer share of top-1 choices and of top-k slots per expert, padding excluded."""
    counts: dict[int, list[torch.Tensor]] = {}

    def cb(layer, tokens, decision):
        e = decision.probs_TE.shape[1]
        valid = tokens.valid_T.to(decision.topk_idx_TK.device)
        top1 = torch.bincount(decision.topk_idx_TK[valid, 0], minlength=e)
        slots = torch.bincount(decision.topk_idx_TK[valid].reshape(-1), minlength=e)
        acc = counts.setdefault(layer, [torch.zeros(e, dtype=torch.long), torch.zeros(e, dtype=torch.long)])
        acc[0] += top1.cpu()
        acc[1] += slots.cpu()

    with RoutingRecorder(model, cb):
        for ids, mask in iter_batches(tokenizer, "stdlib", split, max_length, batch_size, num_samples):
            model(input_ids=ids, attention_mask=mask)
    out = {}
    for layer, (top1, slots) in sorted(counts.items()):
        out[str(layer)] = {
            "top1_share": (top1.double() / top1.sum()).tolist(),
            "topk_slot_share": (slots.double() / slots.sum()).tolist(),
        }
    out["min_top1_share"] = min(min(v["top1_share"]) for v in out.values())
    return out


def measure(model: Any, tokenizer: Any, recipe: Recipe, num_samples: int | None = None) -> dict[str, Any]:
    model.eval()
    test = corpus_perplexity(model, tokenizer, "stdlib", "test", recipe.seq_len, 8, num_samples)
    uni = unigram_perplexity(tokenizer, unigram_counts(tokenizer), "stdlib", "test", recipe.seq_len, 8, num_samples)
    probe = next(iter_batches(tokenizer, "stdlib", "test", recipe.seq_len, 8, 8))[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cost = forward_cost_shares(model, probe, repeats=5)
    finally:
        torch.set_num_threads(threads)
    return {
        "test_perplexity": test.perplexity,
        "test_tokens": test.tokens,
        "unigram_perplexity": uni.perplexity,
        "perplexity_ratio": test.perplexity / uni.perplexity,
        "expert_load": expert_load(model, tokenizer, "test", recipe.seq_len, 8, num_samples),
        "cost_shares": cost,
        "forward_tokens_per_s": cost["tokens"] / cost["forward_seconds_median"],
    }


def _card_markdown(recipe: Recipe, state: dict, metrics: dict, n_params: dict) -> str:
    shares = metrics["cost_shares"]["shares"]
    load = metrics["expert_load"]
    layer_rows = "\n".join(
        f"| {layer} | " + " | ".join(f"{100 * s:.1f}" for s in v["top1_share"]) + f" | {100 * min(v['top1_share']):.1f} |"
        for layer, v in load.items() if layer != "min_top1_share"
    )
    e = recipe.num_local_experts
    header = "| layer | " + " | ".join(f"e{i}" for i in range(e)) + " | min |"
    sep = "|---" * (e + 2) + "|"
    ok_ppl = metrics["perplexity_ratio"] <= QUALITY_MAX_PPL_RATIO
    ok_load = load["min_top1_share"] >= QUALITY_MIN_EXPERT_SHARE
    return f"""# reference-moe

A small Mixtral-architecture MoE trained from scratch on CPU by `varmoe train-reference`, so that
var-moe has a real trained model that runs offline. It is the default model of the server, the
demo and the tests. Not a general-purpose language model: it has read Python's standard library.

## Recipe
- Corpus: the `.py` files of the Python {platform.python_version()} standard library (site-packages
  excluded), split by file with SHA-256 of the relative path: 80% train / 10% calibration / 10% test.
- Tokenizer: byte-level BPE, vocabulary {recipe.vocab_size}, trained on the train split.
- Model: MixtralForCausalLM, hidden {recipe.hidden_size}, {recipe.num_hidden_layers} layers,
  {recipe.num_attention_heads} heads, {recipe.num_local_experts} experts of width {recipe.intermediate_size},
  top-{recipe.num_experts_per_tok}; {n_params['total']:,} parameters ({n_params['experts']:,} in experts,
  {n_params['active']:,} active per token).
- Training: {state['step']} steps x {recipe.batch_size} x {recipe.seq_len} tokens = {state['tokens_seen']:,} tokens seen,
  AdamW lr {recipe.lr} (warm-up {recipe.warmup_steps}, cosine to {recipe.min_lr_ratio:g}x), per-layer balancing loss
  (coefficient {recipe.balance_coef}, {recipe.balance_top1_weight:g} of it on top-1 choices), experts implementation
  `{recipe.experts_implementation}`, {recipe.threads} thread(s), {state['train_seconds'] / 60:.1f} minutes of training.
- Final train cross-entropy: {state['last_ce']:.3f} nats/token. Full recipe: `recipe.json`.

## Quality (test split, {metrics['test_tokens']:,} predicted tokens, padding masked, context {recipe.seq_len})
| measure | value | bar |
|---|---|---|
| test perplexity | {metrics['test_perplexity']:.2f} | |
| unigram perplexity (add-one, train counts, same targets) | {metrics['unigram_perplexity']:.2f} | |
| ratio | {metrics['perplexity_ratio']:.3f} | <= 0.333: {'PASS' if ok_ppl else 'FAIL'} |
| lowest expert share of top-1 choices, any layer | {100 * load['min_top1_share']:.1f}% | >= 3%: {'PASS' if ok_load else 'FAIL'} |

## Expert load: share of top-1 choices on the test split (%)
{header}
{sep}
{layer_rows}

## Cost of a forward pass (batch 8 x {recipe.seq_len}, 1 thread, median of 5)
| router | experts | attention | output layer | other |
|---|---|---|---|---|
| {100 * shares['router']:.1f}% | {100 * shares['experts']:.1f}% | {100 * shares['attention']:.1f}% | {100 * shares['output_layer']:.1f}% | {100 * shares['other']:.1f}% |

Forward throughput: {metrics['forward_tokens_per_s']:,.0f} tokens/s. All numbers: `card.json`.
Reproduce: `varmoe train-reference` (training), `varmoe train-reference --card-only` (this card).
"""


def parameter_counts(model: Any, recipe: Recipe) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - experts + experts * recipe.num_experts_per_tok // recipe.num_local_experts
    return {"total": total, "experts": experts, "active": active}


def write_model_folder(model: Any, tokenizer: Any, recipe: Recipe, state: dict, out_dir: str | Path,
                       metrics: dict | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "recipe.json").write_text(recipe.to_json() + "\n")
    metrics = metrics or measure(model, tokenizer, recipe)
    n_params = parameter_counts(model, recipe)
    card = {"recipe": json.loads(recipe.to_json()), "training": state, "parameters": n_params, **metrics,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "python": platform.python_version()}}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(_card_markdown(recipe, state, metrics, n_params))
    return card
