"""Evaluate a trained reference model and write its folder: weights, tokenizer, card.json, MODEL_CARD.md.

`measure(model, tokenizer, recipe)` computes the numbers the card reports (held-out test
perplexity, unigram baseline on the same targets, per-layer expert load on the test split, forward
cost shares), all on the recipe's dataset; `write_model_folder(...)` saves everything under
`models/reference-moe/` or `models/reference-moe-2/`. With `save_dtype` bfloat16 the weights are
rounded to bfloat16 before measuring, so the card describes the committed weights.
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
from .recipe import RECIPES, Recipe

QUALITY_MAX_PPL_RATIO = 1 / 3  # test perplexity must be at most a third of the unigram baseline's
QUALITY_MIN_EXPERT_SHARE = 0.03  # 8 experts: every expert of every layer gets at least 3% of top-1 choices


def min_expert_share_bar(num_experts: int) -> float:
    """Lowest acceptable top-1 share of any expert: 3% with 8 experts or fewer, else 0.2 / E
    (a fifth of a uniform share; 0.31% at 64 experts)."""
    return QUALITY_MIN_EXPERT_SHARE if num_experts <= 8 else 0.2 / num_experts


@torch.no_grad()
def expert_load(model: Any, tokenizer: Any, split: str = "test", max_length: int = 256, batch_size: int = 8,
                num_samples: int | None = None, dataset: str = "stdlib") -> dict[str, Any]:
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
        for ids, mask in iter_batches(tokenizer, dataset, split, max_length, batch_size, num_samples):
            model(input_ids=ids, attention_mask=mask)
    out = {}
    for layer, (top1, slots) in sorted(counts.items()):
        out[str(layer)] = {
            "top1_share": (top1.double() / top1.sum()).tolist(),
            "topk_slot_share": (slots.double() / slots.sum()).tolist(),
        }
    out["min_top1_share"] = min(min(v["top1_share"]) for v in out.values())
    return out


def measure(model: Any, tokenizer: Any, recipe: Recipe, num_samples: int | None = None,
            train_counts: torch.Tensor | None = None) -> dict[str, Any]:
    """The card's numbers. `train_counts`: unigram counts of the train split's tokens when already at
    hand (training caches them), else counted here by tokenizing the train split again."""
    model.eval()
    ds = recipe.dataset
    if num_samples is None and recipe.eval_sequences:
        num_samples = recipe.eval_sequences
    test = corpus_perplexity(model, tokenizer, ds, "test", recipe.seq_len, 8, num_samples)
    # unigram counts from the recipe's train split: the baseline "fit on the same training text"
    if train_counts is None:
        train_counts = unigram_counts(tokenizer, ds)
    uni = unigram_perplexity(tokenizer, train_counts, ds, "test", recipe.seq_len, 8, num_samples)
    probe = next(iter_batches(tokenizer, ds, "test", recipe.seq_len, 8, 8))[0]
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
        "expert_load": expert_load(model, tokenizer, "test", recipe.seq_len, 8, num_samples, ds),
        "cost_shares": cost,
        "forward_tokens_per_s": cost["tokens"] / cost["forward_seconds_median"],
    }


def _load_table(load: dict, num_experts: int) -> str:
    """Top-1 shares per layer: every expert's column for a few experts, a summary for many."""
    layers = [(layer, v["top1_share"]) for layer, v in load.items() if layer != "min_top1_share"]
    if num_experts <= 8:
        header = "| layer | " + " | ".join(f"e{i}" for i in range(num_experts)) + " | min |"
        sep = "|---" * (num_experts + 2) + "|"
        rows = [f"| {layer} | " + " | ".join(f"{100 * x:.1f}" for x in sh) + f" | {100 * min(sh):.1f} |"
                for layer, sh in layers]
        return "\n".join([header, sep, *rows])
    uniform = 100 / num_experts
    header = f"| layer | min | median | max | experts below {100 * min_expert_share_bar(num_experts):.2f}% |"
    rows = []
    for layer, sh in layers:
        t = torch.tensor(sh) * 100
        below = int((t < 100 * min_expert_share_bar(num_experts)).sum())
        rows.append(f"| {layer} | {t.min():.2f} | {t.median():.2f} | {t.max():.2f} | {below} |")
    return "\n".join([f"(uniform share: {uniform:.2f}%)", "", header, "|---|---|---|---|---|", *rows])


def _model_line(recipe: Recipe, n_params: dict) -> str:
    if recipe.architecture == "qwen2_moe":
        shape = (f"Qwen2MoeForCausalLM, hidden {recipe.hidden_size}, {recipe.num_hidden_layers} MoE layers, "
                 f"{recipe.num_attention_heads} heads, {recipe.num_local_experts} routed experts of width "
                 f"{recipe.intermediate_size}, top-{recipe.num_experts_per_tok} (softmax, top-k weights "
                 f"{'renormalised' if recipe.norm_topk_prob else 'not renormalised'}), plus {recipe.num_shared_experts} "
                 f"shared expert of width {recipe.shared_expert_intermediate_size} behind a sigmoid gate")
    else:
        shape = (f"MixtralForCausalLM, hidden {recipe.hidden_size}, {recipe.num_hidden_layers} layers, "
                 f"{recipe.num_attention_heads} heads, {recipe.num_local_experts} experts of width "
                 f"{recipe.intermediate_size}, top-{recipe.num_experts_per_tok}")
    return (f"{shape}; {n_params['total']:,} parameters ({n_params['experts']:,} in routed experts, "
            f"{n_params['active']:,} active per token), saved as {recipe.save_dtype}.")


def _corpus_line(recipe: Recipe) -> str:
    split = "split by document with SHA-256 of its id: 80% train / 10% calibration / 10% test"
    if recipe.dataset == "stdlib":
        return (f"the `.py` files of the Python {platform.python_version()} standard library (site-packages "
                f"excluded), {split}.")
    if recipe.dataset == "prose-code":
        return ("`prose-code`: English prose and code, offline: the Linux kernel's documentation "
                "(`.rst`/`.txt` from Debian's `linux-doc`, translations excluded), Python's documentation "
                "(reStructuredText sources from Debian's `python3-doc`) and the `.py` files of the Python "
                f"{platform.python_version()} standard library, {split}.")
    return f"`{recipe.dataset}`, {split}."


def _card_markdown(recipe: Recipe, state: dict, metrics: dict, n_params: dict, name: str = "reference-moe") -> str:
    shares = metrics["cost_shares"]["shares"]
    load = metrics["expert_load"]
    e = recipe.num_local_experts
    bar = min_expert_share_bar(e)
    ok_ppl = metrics["perplexity_ratio"] <= QUALITY_MAX_PPL_RATIO
    ok_load = load["min_top1_share"] >= bar
    if name == "reference-moe":
        intro = ("A small Mixtral-architecture MoE trained from scratch on CPU by `varmoe train-reference`, so that\n"
                 "var-moe has a real trained model that runs offline. It is the default model of the server, the\n"
                 "demo and the tests. Not a general-purpose language model: it has read Python's standard library.")
    else:
        intro = (f"A small MoE of today's fine-grained shape ({e} routed experts, top-{recipe.num_experts_per_tok}, "
                 f"{recipe.num_shared_experts} shared expert, {recipe.num_hidden_layers} MoE layers), trained from scratch on CPU by\n"
                 f"`varmoe train-reference --recipe {name if name in RECIPES else 'recipe.json'}`. Not a general-purpose language model: it has read\n"
                 "technical documentation and Python code.")
    stop = ""
    if recipe.time_budget_s:
        stop = (f" The learning-rate schedule ran on the larger of step progress and time progress against a "
                f"{recipe.time_budget_s / 60:g}-minute budget; training ended at step {state['step']} of at most "
                f"{recipe.max_steps}.")
    if recipe.finish_steps:
        stop += (f" Then a final balancing stage: {state.get('finish_step', 0)} of {recipe.finish_steps} steps at lr "
                 f"{recipe.lr * recipe.min_lr_ratio:g} with balancing coefficient {recipe.finish_balance_coef:g}, "
                 f"{recipe.finish_balance_top1_weight:g} of it on top-1 choices.")
    steps = state["step"] + state.get("finish_step", 0)
    order = ", documents in hashed order" if recipe.dataset == "prose-code" else ""
    eval_scope = (f"the first {recipe.eval_sequences} sequences of the test split{order}"
                  if recipe.eval_sequences else "the test split")
    return f"""# {name}

{intro}

## Recipe
- Corpus: {_corpus_line(recipe)}
- Tokenizer: byte-level BPE, vocabulary {recipe.vocab_size}, trained on the train split.
- Model: {_model_line(recipe, n_params)}
- Training: {steps} steps x {recipe.batch_size} x {recipe.seq_len} tokens = {state['tokens_seen']:,} tokens seen,
  AdamW lr {recipe.lr} (warm-up {recipe.warmup_steps}, cosine to {recipe.min_lr_ratio:g}x), per-layer balancing loss
  (coefficient {recipe.balance_coef}, {recipe.balance_top1_weight:g} of it on top-1 choices), experts implementation
  `{recipe.experts_implementation}`, {recipe.threads} thread(s), {state['train_seconds'] / 60:.1f} minutes of training.{stop}
- Final train cross-entropy: {state['last_ce']:.3f} nats/token. Full recipe: `recipe.json`.

## Quality ({eval_scope}: {metrics['test_tokens']:,} predicted tokens, padding masked, context {recipe.seq_len})
| measure | value | bar |
|---|---|---|
| test perplexity | {metrics['test_perplexity']:.2f} | |
| unigram perplexity (add-one, train counts, same targets) | {metrics['unigram_perplexity']:.2f} | |
| ratio | {metrics['perplexity_ratio']:.3f} | <= 0.333: {'PASS' if ok_ppl else 'FAIL'} |
| lowest expert share of top-1 choices, any layer | {100 * load['min_top1_share']:.2f}% | >= {100 * bar:.2f}%: {'PASS' if ok_load else 'FAIL'} |

## Expert load: share of top-1 choices on the test split (%)
{_load_table(load, e)}

## Cost of a forward pass (batch 8 x {recipe.seq_len}, 1 thread, median of 5)
| router | experts | attention | output layer | other |
|---|---|---|---|---|
| {100 * shares['router']:.1f}% | {100 * shares['experts']:.1f}% | {100 * shares['attention']:.1f}% | {100 * shares['output_layer']:.1f}% | {100 * shares['other']:.1f}% |

Forward throughput: {metrics['forward_tokens_per_s']:,.0f} tokens/s. All numbers: `card.json`.
Reproduce: `varmoe train-reference{'' if name == 'reference-moe' else ' --recipe ' + (name if name in RECIPES else 'recipe.json')} --work-dir WORK --output {name}` (training),
`varmoe train-reference --card-only --work-dir WORK --output {name}` (this card).
"""


def parameter_counts(model: Any, recipe: Recipe) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - experts + experts * recipe.num_experts_per_tok // recipe.num_local_experts
    return {"total": total, "experts": experts, "active": active}


def write_model_folder(model: Any, tokenizer: Any, recipe: Recipe, state: dict, out_dir: str | Path,
                       metrics: dict | None = None, train_counts: torch.Tensor | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if recipe.save_dtype == "bfloat16":
        # measure exactly what is committed: weights rounded to bfloat16, run in float32
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        model = model.to(torch.float32)
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "recipe.json").write_text(recipe.to_json() + "\n")
    metrics = metrics or measure(model, tokenizer, recipe, train_counts=train_counts)
    n_params = parameter_counts(model, recipe)
    card = {"recipe": json.loads(recipe.to_json()), "training": state, "parameters": n_params, **metrics,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                         "python": platform.python_version()}}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(_card_markdown(recipe, state, metrics, n_params, out.resolve().name))
    return card
