"""The reference-model recipe: one frozen dataclass with every choice that shapes the model.

Changing any field changes the model; each committed model folder (`models/reference-moe/`,
`models/reference-moe-2/`) holds the `recipe.json` it was trained with. Two architectures:
`mixtral` (routed experts only) and `qwen2_moe` (routed experts plus a gated shared expert);
`RECIPES` names the built-in ones. JSON round-trip: `Recipe.from_json(r.to_json()) == r`.
Test: `pytest tests/test_reference_train.py tests/test_reference_recipe_2.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from ..errors import InvalidInputError


ARCHITECTURES = ("mixtral", "qwen2_moe")


@dataclass(frozen=True)
class Recipe:
    # corpus / tokenizer
    dataset: str = "stdlib"  # built-in corpus; training uses its `train` split only
    vocab_size: int = 4096  # small vocabulary so the experts, not the output layer, dominate cost
    # model shape
    architecture: str = "mixtral"  # "mixtral" or "qwen2_moe"
    hidden_size: int = 128
    intermediate_size: int = 256  # width of each routed expert
    shared_expert_intermediate_size: int = 0  # qwen2_moe: width of its one gated shared expert
    norm_topk_prob: bool = False  # qwen2_moe: renormalise the top-k weights (Qwen1.5-MoE does not)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 512
    # optimisation
    seq_len: int = 256  # train at the context length we evaluate at
    batch_size: int = 16
    max_steps: int = 2000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    # Per-layer balancing loss (transformers' pooled loss hides single-layer collapse). The top-1
    # term pushes on first choices too: the slot-only loss let experts survive as second choice.
    balance_coef: float = 0.04
    balance_top1_weight: float = 0.5  # share of the balance loss computed on top-1 choices
    experts_implementation: str = "grouped_mm"  # ~1.7x faster than eager for training on CPU
    seed: int = 1234
    threads: int = 1  # one thread beat two when another process shared the 2 cores
    checkpoint_every: int = 100
    eval_every: int = 200
    # Wall-clock training budget in seconds (0: none). When set, the cosine schedule runs on
    # max(step / max_steps, train_seconds / time_budget_s) and training ends when either reaches 1,
    # so a run on a busy machine still finishes on time with a fully decayed learning rate; the
    # steps it reached are in the card. It makes the result depend on the machine's speed.
    time_budget_s: float = 0.0
    # Final balancing stage: after the main stage ends, this many more steps at the schedule's final
    # learning rate with a stronger, top-1-only balancing loss. With 64 experts the main stage left a
    # few experts of the first layer with a fifth of the wanted share of first choices; 200 steps of
    # this lifted every layer's least-used expert to about 0.6% while cross-entropy held.
    finish_steps: int = 0
    finish_balance_coef: float = 1.0
    finish_balance_top1_weight: float = 1.0
    # evaluation and saving
    eval_sequences: int = 0  # held-out sequences the card measures (0: the whole test split)
    save_dtype: str = "float32"  # "bfloat16" halves the committed weights; the card measures the saved weights

    def __post_init__(self) -> None:
        if self.num_experts_per_tok > self.num_local_experts:
            raise InvalidInputError("num_experts_per_tok must not exceed num_local_experts")
        if self.seq_len > self.max_position_embeddings:
            raise InvalidInputError("seq_len must not exceed max_position_embeddings")
        for name in ("vocab_size", "hidden_size", "batch_size", "max_steps", "threads", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"{name} must be positive")
        if self.architecture not in ARCHITECTURES:
            raise InvalidInputError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.architecture == "mixtral" and self.shared_expert_intermediate_size:
            raise InvalidInputError("shared_expert_intermediate_size needs architecture 'qwen2_moe'")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise InvalidInputError("save_dtype must be 'float32' or 'bfloat16'")
        if self.eval_sequences < 0:
            raise InvalidInputError("eval_sequences must not be negative")
        if self.time_budget_s < 0:
            raise InvalidInputError("time_budget_s must not be negative")
        if not 0 <= self.balance_top1_weight <= 1:
            raise InvalidInputError("balance_top1_weight must be in [0, 1]")
        if not 0 <= self.finish_balance_top1_weight <= 1:
            raise InvalidInputError("finish_balance_top1_weight must be in [0, 1]")
        if self.finish_steps < 0 or self.finish_balance_coef < 0:
            raise InvalidInputError("finish_steps and finish_balance_coef must not be negative")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown recipe fields: {unknown}")
        return cls(**data)

    @property
    def num_shared_experts(self) -> int:
        return 1 if self.shared_expert_intermediate_size else 0

    def model_config(self, tokenizer_ids: dict[str, int]):
        if self.architecture == "qwen2_moe":
            from transformers import Qwen2MoeConfig

            return Qwen2MoeConfig(
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                # dense MLP width; unused because every layer is sparse (decoder_sparse_step=1)
                intermediate_size=self.intermediate_size,
                moe_intermediate_size=self.intermediate_size,
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads,
                num_key_value_heads=self.num_key_value_heads,
                num_experts=self.num_local_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                max_position_embeddings=self.max_position_embeddings,
                router_aux_loss_coef=self.balance_coef,
                tie_word_embeddings=False,
                use_cache=True,
                **tokenizer_ids,
            )
        from transformers import MixtralConfig

        return MixtralConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            max_position_embeddings=self.max_position_embeddings,
            router_aux_loss_coef=self.balance_coef,
            tie_word_embeddings=False,
            use_cache=True,
            **tokenizer_ids,
        )


# The second reference model: today's fine-grained shape (OLMoE's 64 experts and top-8, plus a
# DeepSeek/Qwen-style shared expert) over 8 layers, on English prose and code, sized to train in
# under two hours on one contended CPU core (about 600 training tokens/s measured) and to stay
# under 64 MB in bfloat16. Expert width 64 is half the hidden size, as in OLMoE.
REFERENCE_MOE_2 = Recipe(
    dataset="prose-code",
    vocab_size=8192,  # prose and code together need more merges than code alone
    architecture="qwen2_moe",
    hidden_size=128,
    intermediate_size=64,
    shared_expert_intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_local_experts=64,
    num_experts_per_tok=8,
    max_position_embeddings=512,
    seq_len=256,
    batch_size=8,  # with ~2M tokens to spend, more optimizer steps beat larger batches
    max_steps=6000,
    lr=3e-3,
    warmup_steps=50,
    # Stronger than the first recipe's: at 0.05 (half on top-1) about half of each layer's 64
    # experts got no top-1 choice after 300k tokens, with the router's entropy still near ln 64.
    balance_coef=0.2,
    balance_top1_weight=0.75,
    checkpoint_every=50,  # about every 3 minutes at ~600 tokens/s
    time_budget_s=4800.0,
    finish_steps=200,
    eval_sequences=600,
    save_dtype="bfloat16",
)
RECIPES = {"reference-moe": Recipe(), "reference-moe-2": REFERENCE_MOE_2}
