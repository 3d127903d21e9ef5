"""VAR on vLLM for the other families it installs into: Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS, DeepSeek-V3
(tiny random models).

For each family a tiny seeded model (var_moe/tiny.py, with the reference tokenizer's vocabulary and
a head size vLLM's CPU attention takes) is saved as a Hugging Face folder, with tables built on the
Hugging Face model (random entries, the model's own identity and router fingerprint) under var/.
A plain vLLM engine and a VAR engine run in subprocesses (tests/vllm_engine/engine_script.py, eager
so that the VAR engine records its per-row decisions), and:

- VAR off, VAR on with empty tables, and VAR off again give plain vLLM's greedy tokens exactly;
- the tables built on the Hugging Face weights are accepted by vLLM's model (same fingerprint),
  tables claiming other weights are refused;
- with the tables on, every recorded row whose token is in the layer's table is routed to the
  table's experts and every other row to the learned ones, and the device counters count exactly
  the table members among the tokens the model processed.

Runs in the vLLM environment only. Ten engine starts: about ten minutes.
Test: `.venv-vllm/bin/python -m pytest -q tests/vllm_engine/test_vllm_families.py`.
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (see make setup-vllm)")

import torch  # noqa: E402

from var_moe.adapters import get_adapter  # noqa: E402
from var_moe.tiny import tiny_model  # noqa: E402
from var_moe.var.tables import VARTables  # noqa: E402

from test_vllm_exact import PROMPTS, run_engine  # noqa: E402  (pytest puts this folder on the path)

FAMILIES = ["qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"]
MAX_TOKENS = 12


# DeepSeek-V3 as vLLM's CPU build takes it: MLA with a latent + rope head of 576, and the released
# checkpoints' `topk_method` / `scoring_func` (a config saved by transformers lacks them, and vLLM
# then routes with a softmax and no selection bias, and cannot load the bias)
V3_FOR_VLLM = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, q_lora_rank=64,
                   topk_method="noaux_tc", scoring_func="sigmoid")


def tiny_vllm_model(family: str, seed: int = 0, **extra):
    """`tiny_model(family)` with the reference tokenizer's vocabulary and a head size vLLM's CPU
    attention takes."""
    over = dict(vocab_size=4096, hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family in ("qwen3_moe", "gpt_oss"):
        over["head_dim"] = 32
    if family == "deepseek_v3":
        over |= V3_FOR_VLLM
    return tiny_model(family, seed=seed, **(over | extra))


def save_with_tokenizer(model, out, reference_model_dir) -> None:
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference_model_dir / name, out / name)
    (out / "var").mkdir()  # beside the weights, vLLM would try to load tables as weights


def build(family: str, out, reference_model_dir) -> VARTables:
    """The tiny model as a Hugging Face folder, its tables (random entries) under var/."""
    model = tiny_vllm_model(family)
    save_with_tokenizer(model, out, reference_model_dir)
    tables = VARTables.empty(model, get_adapter(model))
    g = torch.Generator().manual_seed(1)
    e, k, v = tables.metadata["num_experts"], tables.metadata["top_k"], tables.metadata["vocab_size"]
    for t in tables.layers.values():
        t.member_V[:] = torch.rand(v, generator=g) < 0.5
        t.experts_VK[:] = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(v)])
        t.weights_VK[:] = 1.0 / k
        t.mass_V[:] = 1.0
    tables.save(out / "var" / "tables.safetensors")
    VARTables.empty(model, get_adapter(model)).save(out / "var" / "empty.safetensors")
    VARTables(tables.layers, {**tables.metadata, "router_fingerprint": "0123456789abcdef"}).save(
        out / "var" / "bad.safetensors")
    return tables


@pytest.fixture(scope="module", params=FAMILIES)
def family_runs(request, tmp_path_factory, reference_model_dir):
    tmp = tmp_path_factory.mktemp(request.param)
    model_dir = tmp / "model"
    tables = build(request.param, model_dir, reference_model_dir)
    var_dir = model_dir / "var"
    spec = {"model": str(model_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
            "tables": str(var_dir / "tables.safetensors"), "empty_tables": str(var_dir / "empty.safetensors"),
            "bad_tables": str(var_dir / "bad.safetensors"), "eager": True}
    return {"family": request.param, "tables": tables,
            "plain": run_engine(tmp, "plain", {**spec, "var": False}),
            "var": run_engine(tmp, "var", {**spec, "var": True})}


def test_off_and_empty_reproduce_plain_vllm(family_runs):
    plain, var = family_runs["plain"]["plain"], family_runs["var"]
    assert var["off"] == plain and var["empty"] == plain and var["off_again"] == plain
    assert var["on"] != plain  # half the vocabulary routed from random tables changes the output


def test_tables_of_these_weights_accepted_others_refused(family_runs):
    var, tables = family_runs["var"], family_runs["tables"]
    assert var["info"]["model_type"] == family_runs["family"]
    assert var["load"]["fingerprint"] == tables.metadata["router_fingerprint"]
    assert "router_fingerprint" in var["bad_tables_error"]


def test_table_rows_get_table_experts_and_counters_count_them(family_runs):
    var, tables = family_runs["var"], family_runs["tables"]
    for ids, rec in zip(var["record_ids"], var["records"]):
        for layer, t in tables.layers.items():
            forwards = [f for f in rec[str(layer)] if len(f["ids"]) == len(ids)]  # the prefill of these ids
            assert len(forwards) == 1
            f = forwards[0]
            ids_T = torch.tensor(f["ids"])
            assert f["fast"] == t.member_V[ids_T].tolist()
            for fast, tok, used, learned in zip(f["fast"], f["ids"], f["experts"], f["learned"]):
                assert used == (t.experts_VK[tok].tolist() if fast else learned)
    # the "on" run processed each prompt and its continuation but the last generated token
    for layer, t in tables.layers.items():
        processed = [tok for ids, gen in zip(var["prompt_ids"], var["on"]) for tok in ids + gen[:-1]]
        fast = int(t.member_V[torch.tensor(processed)].sum())
        assert var["counts_on"][str(layer)][0] == fast
        assert var["counts_on"][str(layer)][1] == len(processed) - fast
