"""The adapter contract: where an MoE family keeps its routers and how to read what they return.

Every family module (mixtral.py, qwen_moe.py, ...) subclasses `MoEAdapter` and states only what
differs: which attribute holds the sparse block and the router, how many experts / top-k the
config declares, how router scores become probabilities, and how the router weighs the experts it
chose (`weight_scale`, `chosen_weights`: renormalised over the set, times a routed scaling factor,
raw scores, or a softmax over the chosen k). Shared experts (always run, never routed) are counted
by `num_shared_experts` and found by `shared_experts`; they never appear among the routed indices.
Everything else in var-moe asks the adapter, so no module path of a modeling file and no router
rule appears anywhere else.

Shape suffixes used here: T = tokens (flattened batch x sequence), E = experts, K = top-k.

Test: `pytest tests/test_adapters.py` builds a tiny random model for every family and checks
that the adapter finds every MoE layer and agrees exactly with the model's own routing;
`pytest tests/test_family_semantics.py` checks each family's router rules (capture, VAR off, tables
built from the family's own capture) against a reference written from the modeling code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError


@dataclass(frozen=True)
class MoELayer:
    """One sparse MoE block inside a decoder layer."""

    layer: int  # index of the decoder layer in the model
    block: nn.Module  # the sparse MoE block (router + experts)
    router: nn.Module  # the router module: the hook / patch point
    router_attr: str  # attribute name of the router on `block` (used to patch it)
    experts: nn.Module  # the routed experts, called as experts(hidden_TH, index_TK, weights_TK)


@dataclass(frozen=True)
class RouterDecision:
    """What a router decided for T tokens, normalised across families.

    probs_TE are float32 router probabilities over all E experts (they sum to one per row);
    topk_idx_TK / topk_w_TK are exactly what the model's experts receive.
    """

    probs_TE: torch.Tensor
    topk_idx_TK: torch.Tensor
    topk_w_TK: torch.Tensor


def looks_like_probabilities(scores_TE: torch.Tensor, atol: float = 1e-3) -> bool:
    """True when a router's first output is already a probability simplex, not logits.

    Some transformers releases return softmax outputs under the name `router_logits`; applying
    softmax twice would flatten every distribution towards uniform and inflate every entropy.
    """
    if scores_TE.numel() == 0:
        return False
    s = scores_TE.detach().float()
    if bool((s < -1e-6).any()) or bool((s > 1 + 1e-6).any()):
        return False
    return bool(torch.allclose(s.sum(-1), torch.ones_like(s[..., 0]), atol=atol))


class MoEAdapter:
    """Base adapter: subclasses set class attributes and override what their family does differently."""

    family: str = ""  # human name, e.g. "mixtral"
    block_attrs: tuple[str, ...] = ("mlp",)  # attribute(s) on the decoder layer holding the MoE block
    router_attr: str = "gate"  # attribute on the block holding the router
    experts_key: str = "num_local_experts"  # config field for E
    score_function: str = "softmax"  # how router scores become probabilities: softmax | sigmoid
    shared_attrs: tuple[str, ...] = ()  # attribute(s) on the block holding always-on shared experts

    def __init__(self, config: Any):
        self.config = config

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.experts_key))

    @property
    def top_k(self) -> int:
        return int(self.config.num_experts_per_tok)

    @property
    def num_shared_experts(self) -> int:
        """Always-on experts beside the routed ones (0 for most families)."""
        return 0

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    # -- how the router weighs its chosen experts ----------------------------------------------
    @property
    def weight_scale(self) -> float | None:
        """The constant this family's router's top-k weights sum to on every row (1.0 for routers
        that renormalise over the chosen set or take a softmax over the chosen k; the routed scaling
        factor for DeepSeek-V3 with `norm_topk_prob`), or None where the weights are raw scores that
        sum to no constant. Served table weights are scaled by it (`var.served.scale_weights`)."""
        return 1.0

    def _norm_topk_scale(self) -> float | None:
        """Softmax routers with a `norm_topk_prob` switch: renormalised (1.0) or raw softmax values."""
        return 1.0 if getattr(self.config, "norm_topk_prob", False) else None

    def chosen_weights(self, scores_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
        """Float32 weights the router would give the experts `idx_TK` of each row, computed from its
        first output `scores_TE` (index E, the experts' empty slot, gets 0). For the router's own
        choice this is its own weights; for another set (a table's) it is the same rule applied to
        that set: here the probabilities of the set, renormalised to `weight_scale` where the router
        renormalises, raw where it does not."""
        e = scores_TE.shape[-1]
        g = self.probabilities(scores_TE).gather(1, idx_TK.long().clamp_max(e - 1)) * (idx_TK < e)
        scale = self.weight_scale
        return g if scale is None else g / g.sum(1, keepdim=True).clamp_min(1e-20) * scale

    def shared_experts(self, block: nn.Module) -> list[nn.Module]:
        """The always-on shared expert modules of one MoE block (empty for most families)."""
        return [m for m in (getattr(block, a, None) for a in self.shared_attrs) if m is not None]

    # -- locating routers --------------------------------------------------------------------
    @staticmethod
    def decoder_layers(model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise InvalidInputError(f"{type(model).__name__} has no `model.layers`; is it a causal LM?")
        return layers

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """Every sparse MoE block in decoder order; dense layers (no router) are skipped."""
        found: list[MoELayer] = []
        for i, layer in enumerate(self.decoder_layers(model)):
            for attr in self.block_attrs:
                block = getattr(layer, attr, None)
                router = getattr(block, self.router_attr, None) if block is not None else None
                if router is not None and hasattr(block, "experts"):
                    found.append(MoELayer(i, block, router, self.router_attr, block.experts))
                    break
        if not found:
            raise InvalidInputError(f"no MoE layers found in {type(model).__name__} by the {self.family} adapter")
        return found

    def select_moe_layers(self, model: nn.Module, indices: Any = None, name: str = "layers") -> list[MoELayer]:
        """The MoE layers whose decoder index is in `indices` (all when None); an index without an
        MoE block is an error naming the argument `name` and listing the MoE layers."""
        layers = self.moe_layers(model)
        if indices is None:
            return layers
        available = [m.layer for m in layers]
        missing = sorted(set(indices) - set(available))
        if missing:
            raise InvalidInputError(f"{name} {missing} have no MoE block; MoE layers are {available}")
        return [m for m in layers if m.layer in set(indices)]

    # -- reading router outputs --------------------------------------------------------------
    def probabilities(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Float32 probabilities over all experts from the router's first output.

        Softmax in fp32: bf16 flips top-k choices for a few % of tokens and biases entropies.
        """
        s = scores_TE.float()
        if self.score_function == "sigmoid":
            # DeepSeek-V3 scores each expert independently; normalise to a distribution so
            # entropy and confidence mean the same thing as for softmax routers.
            p = torch.sigmoid(s)
            return p / p.sum(-1, keepdim=True).clamp_min(1e-20)
        if looks_like_probabilities(s):
            return s
        return torch.softmax(s, dim=-1)

    def decision(self, router_output: tuple) -> RouterDecision:
        """Normalise a router module's return value `(router_logits, weights, indices)`."""
        if not isinstance(router_output, tuple) or len(router_output) != 3:
            raise TypeError(
                f"{self.family} router returned {type(router_output).__name__}; expected the transformers v5 "
                "contract (router_logits, weights, indices)"
            )
        scores, weights, indices = router_output
        scores_TE = scores.reshape(-1, scores.shape[-1])
        return RouterDecision(
            probs_TE=self.probabilities(scores_TE),
            topk_idx_TK=indices.reshape(scores_TE.shape[0], -1),
            topk_w_TK=weights.reshape(scores_TE.shape[0], -1),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_type": getattr(self.config, "model_type", None),
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_shared_experts": self.num_shared_experts,
            "score_function": self.score_function,
            "weight_scale": self.weight_scale,
        }
