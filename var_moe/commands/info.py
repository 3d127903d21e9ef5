"""`varmoe info MODEL`: family, layers, experts, top-k, parameter counts and (if known) quality.

Reads the config through the adapter registry and counts parameters from the weights; for the
reference model it also prints the held-out perplexity from its card.json. Run `varmoe info models/reference-moe`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..loading import REFERENCE_MODEL_DIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe an MoE model: family, layers, E, k, parameters, quality")
    p.add_argument("model", nargs="?", default=str(REFERENCE_MODEL_DIR), help="local folder or hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=run)


def describe(path: str, trust_remote_code: bool = False) -> dict:
    from ..adapters import get_adapter
    from ..loading import load_model

    model, _ = load_model(path, trust_remote_code=trust_remote_code)
    adapter = get_adapter(model)
    info = adapter.describe()
    moe_layers = adapter.moe_layers(model)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in moe_layers for p in m.experts.parameters())
    info.update(
        model=path,
        moe_layers=[m.layer for m in moe_layers],
        vocab_size=int(model.config.vocab_size),
        hidden_size=int(model.config.hidden_size),
        parameters_total=total,
        parameters_routed_experts=experts,
        parameters_active_per_token=total - experts + experts * adapter.top_k // adapter.num_experts,
    )
    card = Path(path) / "card.json"
    if card.exists():
        data = json.loads(card.read_text())
        info.update(test_perplexity=data.get("test_perplexity"), unigram_perplexity=data.get("unigram_perplexity"),
                    min_expert_top1_share=data.get("expert_load", {}).get("min_top1_share"))
    return info


def run(args: argparse.Namespace) -> int:
    info = describe(args.model, args.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    return 0
