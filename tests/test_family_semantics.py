"""Each MoE family's router semantics, exactly: capture, VAR off, and tables from its own capture.

Per case (a family, with the router options that change its rule: `norm_topk_prob` both ways,
DeepSeek-V3's sigmoid scores with a nonzero `e_score_correction_bias`, `n_group` > 1 / `topk_group`
and `routed_scaling_factor` != 1, DeepSeek-V2's group-limited greedy top-k, Qwen2-MoE's gated
shared expert, GPT-OSS's biased router, Phi-MoE's sparsemixer), on a tiny seeded random model:

(a) the capture hooks (`RoutingRecorder`, through the adapter) record exactly what the router module
    returns when called directly on the same input, and that equals a reference written here from
    the modeling code (so a feature the router skipped, e.g. the bias or the group limit, would
    show); shared experts run on every row and never appear among the routed indices;
(b) VAR disabled, and VAR on with empty tables, give the original logits bit for bit;
(c) tables built by the real path (`collect_evidence` -> `VARTables.from_evidence`) from the
    family's own routing reproduce its decisions and weights. Attention output projections are
    zeroed, so every layer's router input, hence its decision, depends on the token alone; then
    every row the tables serve must get exactly the router's experts and, to float tolerance, its
    weights (`weights_source` "table": the stored weights scaled by `adapter.weight_scale`;
    "learned": `adapter.chosen_weights`), every other row the router's own decision bit for bit,
    and the logits must match the original's.

Run: `pytest tests/test_family_semantics.py` (about a minute on two cores).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from var_moe.adapters import SUPPORTED_FAMILIES, get_adapter
from var_moe.capture.recorder import RoutingRecorder
from var_moe.tiny import tiny_model
from var_moe.var.config import VARConfig
from var_moe.var.eval_data import EvalBatch
from var_moe.var.evidence import collect_evidence
from var_moe.var.tables import VARTables
from var_moe.var.wrapper import VARModelWrapper

torch.set_num_threads(1)

_GROUPS = dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2)
# case -> (family, config overrides)
CASES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", {}),
    "olmoe": ("olmoe", {}),
    "qwen2_moe_shared_raw": ("qwen2_moe", dict(norm_topk_prob=False)),
    "qwen2_moe_shared_norm": ("qwen2_moe", dict(norm_topk_prob=True)),
    "qwen3_moe_norm": ("qwen3_moe", dict(norm_topk_prob=True)),
    "qwen3_moe_raw": ("qwen3_moe", dict(norm_topk_prob=False)),
    "deepseek_v3_norm": ("deepseek_v3", dict(_GROUPS, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "deepseek_v3_raw": ("deepseek_v3", dict(_GROUPS, norm_topk_prob=False, routed_scaling_factor=1.7)),
    "deepseek_v2_group": ("deepseek_v2", dict(_GROUPS, topk_method="group_limited_greedy", routed_scaling_factor=1.3)),
    "gpt_oss": ("gpt_oss", {}),
    "granitemoe": ("granitemoe", {}),
    # a tiny model's logits are close together in absolute terms but far apart relative to their
    # size: with the default jitter (0.01) sparsemixer masks every other expert and both weights are
    # 1; at 0.5 the masks keep some experts and the weights vary
    "phimoe": ("phimoe", dict(router_jitter_noise=0.5)),
}
VOCAB = range(3, 99)  # tiny models' vocabulary of 99, less pad / bos / eos


def test_every_family_has_a_case():
    assert {f for f, _ in CASES.values()} == set(SUPPORTED_FAMILIES)


def build(case: str, seed: int, token_only: bool = False):
    family, over = CASES[case]
    model = tiny_model(family, seed=seed, **over)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in adapter.moe_layers(model):
            if hasattr(m.router, "e_score_correction_bias"):
                # on the scale of the sigmoid scores' spread, so that it changes some choices, not all
                logits = F.linear(torch.randn(64, m.router.weight.shape[1], generator=g), m.router.weight.float())
                spread = float(torch.sigmoid(logits).std())
                m.router.e_score_correction_bias.copy_(torch.randn(adapter.num_experts, generator=g) * spread)
        if token_only:  # attention adds nothing: each layer's input is a function of the token
            for layer in model.model.layers:
                for p in layer.self_attn.o_proj.parameters():
                    p.zero_()
    return model, adapter


# -- a reference router per family, written from the modeling code ---------------------------------
def reference(case: str, router: torch.nn.Module, h: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of each row, sorted by expert id."""
    family, _ = CASES[case]
    k = cfg.num_experts_per_tok
    if family in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe"):
        p = torch.softmax(F.linear(h, router.weight).float(), -1)
        w, idx = p.topk(k, -1)
        if family == "mixtral" or cfg.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
    elif family in ("deepseek_v3", "deepseek_v2"):
        logits = F.linear(h.float(), router.weight.float())
        e, groups = logits.shape[-1], cfg.n_group
        if family == "deepseek_v3":
            s = torch.sigmoid(logits)
            choice = s + router.e_score_correction_bias
            group_score = choice.view(-1, groups, e // groups).topk(2, -1).values.sum(-1)
        else:
            s = torch.softmax(logits, -1)
            choice = s
            group_score = choice.view(-1, groups, e // groups).max(-1).values
        keep = torch.zeros_like(group_score).scatter(1, group_score.topk(cfg.topk_group, -1).indices, 1.0).bool()
        choice = choice.masked_fill(~keep.repeat_interleave(e // groups, 1), float("-inf"))
        idx = choice.topk(k, -1).indices
        w = s.gather(1, idx)
        if family == "deepseek_v3" and cfg.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w * cfg.routed_scaling_factor
    elif family in ("gpt_oss", "granitemoe"):
        logits = F.linear(h, router.weight, getattr(router, "bias", None))
        top, idx = logits.topk(k, -1)
        w = torch.softmax(top.float(), -1)
    elif family == "phimoe":  # sparsemixer, eval mode, top-2
        s, eps = F.linear(h, router.weight), cfg.router_jitter_noise
        idx, w, masked = [], [], s
        for _ in range(2):
            top, i = masked.max(-1, keepdim=True)
            far = ((top - s) / s.abs().clamp(min=top)) > 2 * eps
            w.append(torch.softmax(masked.masked_fill(far, float("-inf")), -1).gather(1, i))
            idx.append(i)
            masked = masked.scatter(1, i, float("-inf"))
        idx, w = torch.cat(idx, 1), torch.cat(w, 1)
    else:
        raise AssertionError(f"no reference for {family}")
    return by_expert(idx, w)


def by_expert(idx_TK: torch.Tensor, w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = idx_TK.long().argsort(-1)
    return idx_TK.long().gather(1, order), w_TK.float().gather(1, order)


def record_router_inputs(routers: dict[int, torch.nn.Module]) -> tuple[dict, list]:
    seen: dict[int, torch.Tensor] = {}
    hooks = [r.register_forward_hook(lambda mod, args, out, _l=l: seen.__setitem__(_l, args[0].detach().clone()))
             for l, r in routers.items()]
    return seen, hooks


def record_expert_inputs(layers) -> tuple[dict, list]:
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.experts.register_forward_pre_hook(
        lambda mod, args, _l=m.layer: seen.__setitem__(_l, (args[1].clone(), args[2].clone()))) for m in layers]
    return seen, hooks


def ids_batch(seed: int, b: int = 3, s: int = 12, low: int = 3) -> torch.Tensor:
    return torch.randint(low, 99, (b, s), generator=torch.Generator().manual_seed(seed))


# -- (a) capture ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_capture_records_the_routers_own_choice_and_weights(case):
    model, adapter = build(case, seed=1)
    layers = adapter.moe_layers(model)
    captured: dict[int, object] = {}
    inputs, hooks = record_router_inputs({m.layer: m.router for m in layers})
    shared_rows: dict[tuple[int, int], list[int]] = {}
    for m in layers:
        for j, mod in enumerate(adapter.shared_experts(m.block)):
            hooks.append(mod.register_forward_hook(
                lambda mod, args, out, _k=(m.layer, j): shared_rows.setdefault(_k, []).append(
                    args[0].reshape(-1, args[0].shape[-1]).shape[0])))
    ids = ids_batch(0)
    t = ids.numel()
    with torch.no_grad(), RoutingRecorder(model, callback=lambda l, tok, dec: captured.__setitem__(l, dec), adapter=adapter):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert sorted(captured) == [m.layer for m in layers]
    changed_by_bias = changed_by_groups = 0
    for m in layers:
        dec, h = captured[m.layer], inputs[m.layer].reshape(t, -1)
        with torch.no_grad():
            logits, w, idx = m.router(h)
            ref_idx, ref_w = reference(case, m.router, h, model.config)
        assert torch.equal(dec.topk_idx_TK, idx.reshape(t, -1)) and torch.equal(dec.topk_w_TK, w.reshape(t, -1))
        assert dec.topk_idx_TK.shape == (t, adapter.top_k)
        got_idx, got_w = by_expert(dec.topk_idx_TK, dec.topk_w_TK)
        assert torch.equal(got_idx, ref_idx), f"{case} layer {m.layer}: the router's choice is not the family's rule"
        torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
        # the family's weight rule, as the adapter states it
        torch.testing.assert_close(adapter.chosen_weights(logits.reshape(t, -1), dec.topk_idx_TK),
                                   dec.topk_w_TK.float(), rtol=1e-5, atol=1e-6)
        if adapter.weight_scale is not None:
            torch.testing.assert_close(dec.topk_w_TK.float().sum(-1), torch.full((t,), adapter.weight_scale))
        else:  # the rule really has no constant sum here
            assert float(dec.topk_w_TK.float().sum(-1).std()) > 1e-4
        # shared experts: always on (every row, every forward), never among the routed indices
        assert bool((dec.topk_idx_TK < adapter.num_experts).all())
        shared = adapter.shared_experts(m.block)
        assert len(shared) == {"qwen2_moe": 2, "deepseek_v3": 1, "deepseek_v2": 1}.get(CASES[case][0], 0)
        assert adapter.num_shared_experts == (1 if shared else 0)
        for j in range(len(shared)):
            assert shared_rows[(m.layer, j)] == [t]
        if CASES[case][0] == "deepseek_v3":
            s = torch.sigmoid(logits.float())
            plain = s.topk(adapter.top_k, -1).indices.sort(-1).values
            biased = s + m.router.e_score_correction_bias
            changed_by_bias += int((biased.topk(adapter.top_k, -1).indices.sort(-1).values != plain).any(-1).sum())
            changed_by_groups += int((biased.topk(adapter.top_k, -1).indices.sort(-1).values != got_idx).any(-1).sum())
    if CASES[case][0] == "deepseek_v3":  # the case exercises both rules, so the reference checks them
        assert changed_by_bias > 0 and changed_by_groups > 0


# -- (b) VAR off ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_var_off_and_empty_tables_equal_the_original(case):
    model, adapter = build(case, seed=2)
    ids = ids_batch(1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    ids[mask == 0] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    for enabled in (False, True):  # VAR disabled; VAR on with empty tables
        with VARModelWrapper(model, VARConfig(enable_var=enabled)) as w, torch.no_grad():
            assert torch.equal(w(input_ids=ids, attention_mask=mask).logits, ref)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)  # restored


# -- (c) tables from the family's own capture ------------------------------------------------------------
def calibration(docs: int = 20, reps: int = 2, piece: int = 64) -> list[EvalBatch]:
    """Documents of every vocabulary token `reps` times in a seeded order, in pieces of `piece`."""
    g = torch.Generator().manual_seed(7)
    vocab = torch.tensor(list(VOCAB))
    out = []
    for d in range(docs):
        doc = torch.cat([vocab[torch.randperm(len(vocab), generator=g)] for _ in range(reps)])
        pieces = doc.reshape(-1, piece)
        out.append(EvalBatch(pieces, torch.ones_like(pieces), [d] * pieces.shape[0]))
    return out


CERTIFY = VARConfig(frequency_threshold=8, target_agreement=0.75)


@pytest.mark.parametrize("weights_source", ["table", "learned"])
@pytest.mark.parametrize("case", CASES)
def test_tables_from_own_capture_reproduce_decisions_and_weights(case, weights_source):
    model, adapter = build(case, seed=3, token_only=True)
    evidence = collect_evidence(model, calibration(), adapter)
    tables = VARTables.from_evidence(evidence, model, adapter, CERTIFY)
    # routing depends on the token alone, so every token is certified in every layer
    assert all(int(t.member_V.sum()) == len(VOCAB) for t in tables.layers.values()), tables.sizes()
    with torch.no_grad():
        ids = torch.cat([ids_batch(2, low=1), torch.tensor([[1, 2] * 6])])  # 1, 2: not in the tables
        ref_logits = model(input_ids=ids).logits
    t = ids.numel()
    served = torch.stack([tables.layers[m.layer].member_V[ids.reshape(-1)] for m in adapter.moe_layers(model)])
    assert bool(served.any()) and not bool(served.all())
    with VARModelWrapper(model, VARConfig(weights_source=weights_source), tables=tables) as w:
        layers = w.moe_layers
        inputs, h1 = record_router_inputs(w.routers)
        experts_in, h2 = record_expert_inputs(layers)
        with torch.no_grad():
            logits = w(input_ids=ids).logits
        for h in h1 + h2:
            h.remove()
        stats = w.get_performance_stats()
    for i, m in enumerate(layers):
        with torch.no_grad():
            _, own_w, own_idx = w.originals[m.layer](inputs[m.layer].reshape(t, -1))
        own_idx, own_w = own_idx.reshape(t, -1), own_w.reshape(t, -1)
        got_idx, got_w = experts_in[m.layer]
        fast = served[i]
        # rows the tables serve: the router's experts exactly, its weights to float tolerance
        a_idx, a_w = by_expert(got_idx[fast], got_w[fast])
        b_idx, b_w = by_expert(own_idx[fast], own_w[fast])
        assert torch.equal(a_idx, b_idx), f"{case} layer {m.layer}: served experts differ from the router's"
        torch.testing.assert_close(a_w, b_w, rtol=1e-5, atol=1e-6)
        # the other rows: the router's own decision, bit for bit
        assert torch.equal(got_idx[~fast], own_idx[~fast]) and torch.equal(got_w[~fast], own_w[~fast])
    assert stats["overall"]["tier_counts"]["fast"] == int(served.sum())
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
