"""A toy capture setup on disk: a tiny random MoE with its own small BPE tokenizer, and a text corpus.

`make_toy_setup(root, family="mixtral")` writes `root/model` (config, weights, tokenizer files,
loadable by `load_model`) and `root/corpus` (a folder of .txt documents, readable as
`--dataset root/corpus`), so the whole `varmoe capture` path (loading, corpus, checkpoints,
distributed ranks) runs in seconds without the reference model. Used by the capture tests and
the capture benchmark's fallback. Smoke run:
    python -c "from var_moe.capture.toy import make_toy_setup; print(make_toy_setup('/tmp/toy'))"
"""

from __future__ import annotations

import random
from pathlib import Path

_WORDS = (
    "the router picks experts for every token of a sequence and the model adds their outputs "
    "def return class import self value list dict none true false for in if else while with as "
    "data batch layer expert token cache table verify route predict fast slow path count mean"
).split()


def toy_texts(num_docs: int = 40, words_per_doc: int = 80, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(num_docs):
        # a few recurring phrases so tokens and (previous, token) pairs repeat
        words = [rng.choice(_WORDS[: 12 + rng.randrange(len(_WORDS) - 12)]) for _ in range(words_per_doc)]
        texts.append(" ".join(words) + "\n")
    return texts


def make_toy_setup(root: str | Path, family: str = "mixtral", seed: int = 0, num_docs: int = 40,
                   vocab_size: int = 300) -> tuple[Path, Path]:
    """Write a tiny model + tokenizer and a corpus under `root`; returns (model_dir, corpus_dir)."""
    from ..reference.tokenizer import train_tokenizer
    from ..tiny import tiny_model

    root = Path(root)
    model_dir, corpus_dir = root / "model", root / "corpus"
    texts = toy_texts(num_docs, seed=seed)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (corpus_dir / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer(texts, vocab_size, model_dir)
    model = tiny_model(family, seed=seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=256)
    model.save_pretrained(model_dir)
    return model_dir, corpus_dir
