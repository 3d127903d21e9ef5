"""Tables built from a family's own capture reproduce vLLM's routing of that family, experts and weights.

For each family VAR installs into on vLLM (Mixtral; Qwen2-MoE with its gated shared expert and raw
top-k weights; Qwen3-MoE with renormalised ones; OLMoE; GPT-OSS with its biased router and softmax
over the chosen k; DeepSeek-V3 with sigmoid scores, a nonzero selection bias, group-limited top-k and
`routed_scaling_factor` != 1, its top-k weights renormalised and raw: vLLM's router leaves the factor
to the MoE runner's output, so served weights are divided by it; DeepSeek-V2 with group-limited
greedy top-k and its scaling factor; GraniteMoE, whose router vLLM renames `gate`), a tiny seeded model (the reference
tokenizer's vocabulary) has its attention output projections zeroed, so every layer's router input,
hence its decision, depends on the token alone. Its tables are built by the real path on the Hugging
Face model (`collect_evidence` over calibration documents holding every vocabulary token, then
`VARTables.from_evidence`), and every token is certified. One VAR engine per family (a subprocess,
eager, tests/vllm_engine/engine_script.py) then serves every row from the tables, and:

- each recorded row's served experts are the experts vLLM's own router chose for it (the learned
  decision, computed anyway), and the served weights are vLLM's router weights to float tolerance
  (the table's stored weights scaled by the family adapter's `weight_scale`);
- greedy generation with every row served equals generation with VAR off.

Runs in the vLLM environment only. Nine engine starts: about twelve minutes.
Test: `.venv-vllm/bin/python -m pytest -q tests/vllm_engine/test_vllm_family_semantics.py`.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (see make setup-vllm)")

import torch  # noqa: E402

from var_moe.adapters import get_adapter  # noqa: E402
from var_moe.var.config import VARConfig  # noqa: E402
from var_moe.var.eval_data import EvalBatch  # noqa: E402
from var_moe.var.evidence import collect_evidence  # noqa: E402
from var_moe.var.tables import VARTables  # noqa: E402

from test_vllm_exact import PROMPTS, run_engine  # noqa: E402  (pytest puts this folder on the path)
from test_vllm_families import save_with_tokenizer, tiny_vllm_model  # noqa: E402

# 4 groups of 2 experts, 2 groups kept, top-3: the group limit changes some choices
_V3 = dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2)
# DeepSeek-V2 as vLLM's CPU build takes it: MLA with a latent + rope head of 576 (no selection bias)
_V2 = dict(_V3, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, q_lora_rank=64)
# case -> (family, config overrides)
CASES = {"mixtral": ("mixtral", {}), "qwen2_moe": ("qwen2_moe", dict(norm_topk_prob=False)),
         "qwen3_moe": ("qwen3_moe", dict(norm_topk_prob=True)), "olmoe": ("olmoe", {}), "gpt_oss": ("gpt_oss", {}),
         "deepseek_v3_norm": ("deepseek_v3", dict(_V3, norm_topk_prob=True, routed_scaling_factor=2.5)),
         "deepseek_v3_raw": ("deepseek_v3", dict(_V3, norm_topk_prob=False, routed_scaling_factor=1.7)),
         # vLLM's DeepSeek-V2 always takes the group-limited top-k: the released checkpoints' method
         "deepseek_v2": ("deepseek_v2", dict(_V2, topk_method="group_limited_greedy", routed_scaling_factor=1.3)),
         "granitemoe": ("granitemoe", {})}
MAX_TOKENS = 12
VOCAB = 4096
CERTIFY = VARConfig(frequency_threshold=8, target_agreement=0.7)


def calibration(docs: int = 20, piece: int = 128) -> list[EvalBatch]:
    """One batch per document: every vocabulary token once, in a seeded order, in pieces of `piece`."""
    g = torch.Generator().manual_seed(7)
    out = []
    for d in range(docs):
        rows = torch.randperm(VOCAB, generator=g).reshape(-1, piece)
        out.append(EvalBatch(rows, torch.ones_like(rows), [d] * rows.shape[0]))
    return out


def build(case: str, out, reference_model_dir) -> VARTables:
    family, over = CASES[case]
    model = tiny_vllm_model(family, seed=0, **over)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in layer.self_attn.o_proj.parameters():
                p.zero_()
    save_with_tokenizer(model, out, reference_model_dir)
    adapter = get_adapter(model)
    tables = VARTables.from_evidence(collect_evidence(model, calibration(), adapter), model, adapter, CERTIFY)
    tables.save(out / "var" / "tables.safetensors")
    VARTables.empty(model, adapter).save(out / "var" / "empty.safetensors")
    VARTables(tables.layers, {**tables.metadata, "router_fingerprint": "0123456789abcdef"}).save(
        out / "var" / "bad.safetensors")
    return tables


@pytest.fixture(scope="module", params=list(CASES))
def family_run(request, tmp_path_factory, reference_model_dir):
    tmp = tmp_path_factory.mktemp(request.param)
    model_dir = tmp / "model"
    tables = build(request.param, model_dir, reference_model_dir)
    var_dir = model_dir / "var"
    spec = {"model": str(model_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "var": True, "eager": True,
            "tables": str(var_dir / "tables.safetensors"), "empty_tables": str(var_dir / "empty.safetensors"),
            "bad_tables": str(var_dir / "bad.safetensors")}
    return {"family": CASES[request.param][0], "tables": tables, "var": run_engine(tmp, "var", spec)}


def test_every_token_certified(family_run):
    for t in family_run["tables"].layers.values():
        assert int(t.member_V.sum()) == VOCAB  # routing depends on the token alone


def test_served_rows_get_vllm_routers_experts_and_weights(family_run):
    var = family_run["var"]
    assert var["info"]["model_type"] == family_run["family"]
    rows = 0
    for ids, rec in zip(var["record_ids"], var["records"]):
        for layer in family_run["tables"].layers:
            f = [f for f in rec[str(layer)] if len(f["ids"]) == len(ids)][0]  # the prefill of these ids
            assert all(f["fast"])
            idx, own_idx = torch.tensor(f["experts"]), torch.tensor(f["learned"])
            w, own_w = torch.tensor(f["weights"]), torch.tensor(f["learned_w"])
            a, b = idx.sort(-1), own_idx.sort(-1)
            assert torch.equal(a.values, b.values), f"{family_run['family']} layer {layer}: served experts differ"
            torch.testing.assert_close(w.gather(1, a.indices), own_w.gather(1, b.indices), rtol=1e-4, atol=1e-5)
            rows += len(ids)
    assert rows > 0


def test_generation_with_every_row_served_equals_var_off(family_run):
    var = family_run["var"]
    assert var["on"] == var["off"]
    for layer in family_run["tables"].layers:
        processed = sum(len(ids) + len(gen) - 1 for ids, gen in zip(var["prompt_ids"], var["on"]))
        assert var["counts_on"][str(layer)][:2] == [processed, 0]  # fast, learned
