"""`varmoe train-reference`: train (or resume) the reference MoE and write models/reference-moe/.

Flags only; the work is in var_moe.reference. Run `varmoe train-reference --help`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..errors import InvalidInputError
from ..loading import REFERENCE_MODEL_DIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-reference", help="train the reference MoE on the standard library (CPU, resumable)")
    p.add_argument("--work-dir", default="runs/reference", help="checkpoints, token cache and training log")
    p.add_argument("--output", default=str(REFERENCE_MODEL_DIR), help="folder for the finished model")
    p.add_argument("--max-steps", type=int, default=None, help="override the recipe's step count")
    p.add_argument("--threads", type=int, default=None, help="torch threads (recipe default: 1)")
    p.add_argument("--recipe", default=None,
                   help="a built-in recipe name (reference-moe, reference-moe-2) or a recipe JSON file "
                        "(default: reference-moe)")
    p.add_argument("--card-only", action="store_true", help="only re-measure a finished run and rewrite the card")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..reference.card import write_model_folder
    from ..reference.recipe import RECIPES, Recipe
    from ..reference.train import train, train_token_counts

    if args.recipe is None or args.recipe in RECIPES:
        recipe = RECIPES[args.recipe or "reference-moe"]
    elif Path(args.recipe).is_file():
        recipe = Recipe.from_json(Path(args.recipe).read_text())
    else:
        raise InvalidInputError(f"--recipe {args.recipe!r}: not a built-in recipe ({', '.join(RECIPES)}) "
                                "nor a JSON file")
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise InvalidInputError("--max-steps must be at least 1")
        recipe = replace(recipe, max_steps=args.max_steps)
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidInputError("--threads must be at least 1")
        recipe = replace(recipe, threads=args.threads)
    if args.card_only:
        saved = Path(args.work_dir) / "recipe.json"
        if not saved.exists():
            raise FileNotFoundError(f"--card-only: no finished run in --work-dir {args.work_dir}")
        recipe = Recipe.from_json(saved.read_text())
    model, tokenizer, state = train(recipe, args.work_dir, progress=not args.no_progress)
    if not state["finished"]:
        print(f"stopped at step {state['step']} of {recipe.max_steps}; run again to resume")
        return 1
    counts = train_token_counts(args.work_dir, len(tokenizer))
    card = write_model_folder(model, tokenizer, recipe, state, args.output, train_counts=counts)
    print(f"wrote {args.output}: test perplexity {card['test_perplexity']:.2f} "
          f"(unigram {card['unigram_perplexity']:.2f}), lowest expert share {100 * card['expert_load']['min_top1_share']:.1f}%")
    return 0
