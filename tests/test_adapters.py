"""Adapters: every family finds all MoE layers and reports exactly the routing its experts receive.

Each family is a tiny seeded random model built from its config (no download)."""

import pytest
import torch

from var_moe.adapters import SUPPORTED_FAMILIES, UnsupportedModelError, get_adapter, looks_like_probabilities
from var_moe.tiny import TINY_FAMILIES, tiny_config, tiny_model

# families whose top-k is the top-k of their reported probabilities (DeepSeek-V3 adds a bias and
# group limits before choosing; the adapter reports the router's own choice, tested below)
PLAIN_TOPK = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "granitemoe", "gpt_oss", "phimoe"}


def test_every_supported_family_has_a_tiny_model():
    assert set(SUPPORTED_FAMILIES) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_finds_layers_and_matches_expert_inputs(family):
    model = tiny_model(family, seed=3)
    adapter = get_adapter(model)
    cfg = model.config
    layers = adapter.moe_layers(model)
    # every decoder layer that has a router is found, and nothing else
    expected = [i for i, layer in enumerate(model.model.layers)
                if any(getattr(getattr(layer, a, None), adapter.router_attr, None) is not None for a in adapter.block_attrs)]
    assert [m.layer for m in layers] == expected
    assert adapter.num_experts == 4 and adapter.top_k == cfg.num_experts_per_tok
    decisions, expert_inputs = {}, {}
    handles = []
    for m in layers:
        handles.append(m.router.register_forward_hook(
            lambda mod, a, out, _l=m.layer: decisions.__setitem__(_l, adapter.decision(out))))
        handles.append(m.experts.register_forward_pre_hook(
            lambda mod, args, _l=m.layer: expert_inputs.__setitem__(_l, (args[1].clone(), args[2].clone()))))
    ids = torch.randint(3, 99, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    assert sorted(decisions) == expected
    for layer, dec in decisions.items():
        idx_TK, w_TK = expert_inputs[layer]
        assert torch.equal(dec.topk_idx_TK, idx_TK), f"{family} layer {layer}: indices differ from the experts' input"
        torch.testing.assert_close(dec.topk_w_TK, w_TK, rtol=0, atol=0)
        assert dec.probs_TE.dtype == torch.float32
        torch.testing.assert_close(dec.probs_TE.sum(-1), torch.ones(27), atol=1e-5, rtol=0)
        if family in PLAIN_TOPK:
            mine = dec.probs_TE.topk(adapter.top_k, dim=-1).indices.sort(-1).values
            assert torch.equal(mine, dec.topk_idx_TK.sort(-1).values)


def test_deepseek_v3_bias_changes_choice_and_adapter_reports_router_choice():
    model = tiny_model("deepseek_v3", seed=1)
    adapter = get_adapter(model)
    assert adapter.score_function == "sigmoid" and adapter.num_shared_experts == 1
    m = adapter.moe_layers(model)[0]
    h = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
    dec = adapter.decision(m.router(h))
    logits = torch.nn.functional.linear(h, m.router.weight)
    # reported probabilities are the normalised sigmoid scores, not a softmax
    p = torch.sigmoid(logits)
    torch.testing.assert_close(dec.probs_TE, p / p.sum(-1, keepdim=True))


def test_probability_outputs_are_detected_not_softmaxed_twice():
    adapter = get_adapter(tiny_config("mixtral"))
    logits = torch.randn(6, 4)
    probs = torch.softmax(logits, -1)
    assert looks_like_probabilities(probs) and not looks_like_probabilities(logits)
    idx = probs.topk(2, -1).indices
    from_logits = adapter.decision((logits, probs.gather(1, idx), idx)).probs_TE
    from_probs = adapter.decision((probs, probs.gather(1, idx), idx)).probs_TE
    torch.testing.assert_close(from_logits, probs)
    torch.testing.assert_close(from_probs, probs)


def test_unsupported_model_lists_families():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="Supported: .*mixtral"):
        get_adapter(LlamaConfig())


def test_wrong_router_contract_is_a_clear_error():
    adapter = get_adapter(tiny_config("olmoe"))
    with pytest.raises(TypeError, match="router_logits, weights, indices"):
        adapter.decision(torch.zeros(3, 4))
