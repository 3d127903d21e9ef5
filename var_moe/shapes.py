"""Routing shapes of published MoE models, and tiny-width random models that have them.

`SHAPES` names the (MoE layers, routed experts, top-k, vocabulary) of models people run today;
the capture benchmark generates synthetic routing at these shapes, and `shape_model(name)`
builds a random model with the real layer count, expert count, top-k and vocabulary but a tiny
hidden width (a few MB of weights besides the embedding), so anything that scales with those
four numbers can be tried on this machine. `save_shape_model(name, dir)` writes it with
`save_pretrained` (weights stay out of the repository: write to a temporary folder).

`layers=`/`vocab_size=` shrink a shape for tests. Test: `pytest tests/test_capture_sparse.py -k shape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInputError


@dataclass(frozen=True)
class Shape:
    model_type: str  # transformers model_type of the family whose router the shape uses
    moe_layers: int  # routed (MoE) layers
    experts: int  # routed experts per layer (shared experts not counted)
    top_k: int
    vocab: int
    dense_layers: int = 0  # leading dense layers (DeepSeek's first_k_dense_replace)
    shared_experts: int = 0


SHAPES: dict[str, Shape] = {
    "mixtral-8x7b": Shape("mixtral", 32, 8, 2, 32000),
    "olmoe-1b-7b": Shape("olmoe", 16, 64, 8, 50304),
    "qwen3-30b-a3b": Shape("qwen3_moe", 48, 128, 8, 151936),
    "gpt-oss-120b": Shape("gpt_oss", 36, 128, 4, 201088),
    "deepseek-v3": Shape("deepseek_v3", 58, 256, 8, 129280, dense_layers=3, shared_experts=1),
    "kimi-k2": Shape("deepseek_v3", 60, 384, 8, 163840, dense_layers=1, shared_experts=1),
}

_TINY = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def shape_config(name: str, layers: int | None = None, vocab_size: int | None = None, **overrides: Any) -> Any:
    """A transformers config with `name`'s routing shape and a tiny width (`layers`: MoE layers)."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise InvalidInputError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    s = SHAPES[name]
    moe = s.moe_layers if layers is None else layers
    kw: dict[str, Any] = dict(_TINY, vocab_size=vocab_size or s.vocab, num_experts_per_tok=s.top_k,
                              num_hidden_layers=moe + s.dense_layers)
    if s.model_type in ("mixtral", "gpt_oss"):
        kw["num_local_experts"] = s.experts
    if s.model_type in ("olmoe", "qwen3_moe"):
        kw["num_experts"] = s.experts
    if s.model_type == "qwen3_moe":
        kw.update(moe_intermediate_size=16, decoder_sparse_step=1, head_dim=8, mlp_only_layers=[])
    if s.model_type == "gpt_oss":
        kw.update(head_dim=8, layer_types=None, sliding_window=16)
    if s.model_type == "deepseek_v3":
        kw.update(n_routed_experts=s.experts, n_shared_experts=s.shared_experts, moe_intermediate_size=16,
                  first_k_dense_replace=s.dense_layers, n_group=8, topk_group=4, kv_lora_rank=8, q_lora_rank=8,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=2)
    kw.update(overrides)
    return AutoConfig.for_model(s.model_type, **kw)


def shape_model(name: str, seed: int = 0, layers: int | None = None, vocab_size: int | None = None) -> Any:
    """A seeded random eval-mode model (float32, CPU) of `name`'s routing shape."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape_config(name, layers, vocab_size))
    with torch.no_grad():  # a zero selection bias would hide the bias-corrected choice
        for layer in model.model.layers:
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


def save_shape_model(name: str, out_dir: str | Path, seed: int = 0, layers: int | None = None,
                     vocab_size: int | None = None, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `shape_model(...)` (and the tokenizer of `tokenizer_dir`, if given) to `out_dir`."""
    out = Path(out_dir)
    shape_model(name, seed, layers, vocab_size).save_pretrained(out)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    return out
