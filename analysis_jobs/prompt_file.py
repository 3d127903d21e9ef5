"""Prompt files for the load tests, cut from a corpus: a JSONL file of realistic prompts, one per line.

Prompts come from the *test* split of a corpus (`stdlib` by default, or any dataset path that
`var_moe.corpus.iter_documents` reads), so load tests never replay calibration text. Each line is
`{"id": ..., "kind": "short"|"long", "text": ...}`: short prompts are a few lines of a document,
long ones a larger chunk, cut at line boundaries; `--fit-model` cuts them to a model's context with
its tokenizer. This needs the library, so it lives here; `loadtests/` only reads such files
(`loadtests.prompts.read_prompts`) and otherwise uses its built-in prompts.

Run: `python -m analysis_jobs.prompt_file --output runs/loadtest/prompts.jsonl --num 200`, then
`python -m loadtests.run --prompts runs/loadtest/prompts.jsonl` (or `VARMOE_LT_PROMPTS=...` for
a plain `locust -f loadtests/locustfile.py`).
Test: `pytest tests/test_loadtests_prompts.py`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from loadtests.prompts import LONG_MIN_CHARS

SHORT_CHARS = (80, 300)  # character ranges; ~4 characters per token on code with the reference BPE
LONG_CHARS = (LONG_MIN_CHARS, 1800)  # the reader's default `kind` agrees with these ranges


def _cut(text: str, lo: int, hi: int, rng: random.Random) -> str:
    """A window of `text` of about lo..hi characters, starting and ending at line boundaries."""
    lines = text.splitlines(keepends=True)
    start = rng.randrange(len(lines))
    out, n = [], 0
    target = rng.randint(lo, hi)
    for line in lines[start:]:
        if n + len(line) > target and n >= lo:
            break
        out.append(line)
        n += len(line)
    piece = "".join(out)[:hi].strip()
    return piece


def build_prompts(dataset: str = "stdlib", split: str = "test", num: int = 200, seed: int = 0,
                  long_share: float = 0.3, max_docs: int = 400) -> list[dict]:
    """`num` prompts drawn from `split` of `dataset` (deterministic for a seed)."""
    if num < 1:
        raise ValueError("--num must be at least 1")
    if not 0.0 <= long_share <= 1.0:
        raise ValueError("--long-share must be in [0, 1]")
    from var_moe.corpus import iter_documents

    docs = [d for d in iter_documents(dataset, split, limit=max_docs) if len(d.text.strip()) >= SHORT_CHARS[0]]
    if not docs:
        raise ValueError(f"--dataset {dataset!r} has no usable documents in split {split!r}")
    rng = random.Random(seed)
    prompts: list[dict] = []
    attempts = 0
    while len(prompts) < num and attempts < 20 * num:  # bounded: documents may yield empty windows
        attempts += 1
        doc = docs[rng.randrange(len(docs))]
        kind = "long" if rng.random() < long_share else "short"
        text = _cut(doc.text, *(LONG_CHARS if kind == "long" else SHORT_CHARS), rng)
        if len(text) >= 20:
            prompts.append({"id": f"{doc.doc_id}@{len(prompts)}", "kind": kind, "text": text})
    if not prompts:
        raise ValueError(f"could not cut any prompt from --dataset {dataset!r}")
    return prompts


def fit_to_model(prompts: list[dict], model_dir: str | Path, reserve: int = 64, max_tokens: int = 1024) -> list[dict]:
    """Cut prompts to what the model accepts: at most min(max_tokens, context - reserve) tokens.

    `reserve` leaves room for the generated tokens (prompt + new tokens must fit the context).
    Uses the model folder's tokenizer; a cut prompt is re-encoded with a margin of 8 tokens because
    decoding and re-encoding a cut can merge bytes differently.
    """
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ctx = int(getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", 10**9) or 10**9)
    limit = min(max_tokens, ctx - 1 - reserve)
    if limit < 16:
        raise ValueError(f"the model's context ({ctx}) leaves no room for prompts after reserving {reserve} tokens")
    out = []
    for p in prompts:
        ids = tok(p["text"])["input_ids"]
        text = p["text"] if len(ids) <= limit else tok.decode(ids[: limit - 8], skip_special_tokens=True)
        out.append({**p, "text": text})
    return out


def write_prompts(prompts: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for p in prompts:
            fh.write(json.dumps(p, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis_jobs.prompt_file", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="stdlib", help="stdlib or a local .txt/.jsonl/.parquet path")
    p.add_argument("--split", default="test")
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-share", type=float, default=0.3)
    p.add_argument("--fit-model", default=None, help="model folder: cut prompts to its context (tokenizer + config)")
    p.add_argument("--reserve", type=int, default=64, help="tokens left for generation when cutting (--fit-model)")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        prompts = build_prompts(args.dataset, args.split, args.num, args.seed, args.long_share)
        if args.fit_model:
            prompts = fit_to_model(prompts, args.fit_model, args.reserve)
        path = write_prompts(prompts, args.output)
    except ValueError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    print(f"wrote {len(prompts)} prompts to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
