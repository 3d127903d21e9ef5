"""The second reference recipe (Qwen2-MoE, many routed experts, a shared expert) at tiny width.

Builds `REFERENCE_MOE_2` shrunk to test size (same architecture, expert count, top-k, shared
expert, layer count), trains a few steps on a synthetic corpus, and checks: the model is the
family the adapter knows, with a shared expert; the time budget ends training with the cosine
schedule fully decayed; a killed run resumes to identical weights; the log carries the lowest
top-1 share; the bfloat16 model folder loads and its card measures the saved weights."""

import json
import math
from dataclasses import replace

import pytest
import torch

from var_moe.adapters import get_adapter
from var_moe.perplexity import corpus_perplexity
from var_moe.reference.card import min_expert_share_bar, write_model_folder
from var_moe.reference.recipe import RECIPES, REFERENCE_MOE_2, Recipe
from var_moe.reference.train import lr_at, min_top1_share, train


def tiny(tmp_path, **kw) -> Recipe:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        words = ["def", "return", "the", "kernel", "module", "value", "for", "in", "if", "driver", "None", "print"]
        g = torch.Generator().manual_seed(0)
        with corpus.open("w") as fh:
            for i in range(80):
                idx = torch.randint(0, len(words), (80,), generator=g).tolist()
                fh.write(json.dumps({"text": " ".join(words[j] for j in idx), "doc_id": f"doc{i}"}) + "\n")
    # the real recipe's routing shape, tiny widths: 64 experts, top-8, 1 shared expert, 8 layers
    base = dict(dataset=str(corpus), vocab_size=300, hidden_size=64, intermediate_size=8,
                shared_expert_intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=32, seq_len=16, batch_size=4, max_steps=6, warmup_steps=2,
                checkpoint_every=2, time_budget_s=0.0, eval_sequences=8)
    base.update(kw)
    return replace(REFERENCE_MOE_2, **base)


def quiet(_):
    pass


def test_recipe_2_has_todays_shape_and_round_trips():
    r = RECIPES["reference-moe-2"]
    assert r.architecture == "qwen2_moe" and r.num_local_experts >= 64 and r.num_experts_per_tok >= 6
    assert r.num_shared_experts >= 1 and r.num_hidden_layers >= 8 and r.threads == 1
    assert Recipe.from_json(r.to_json()) == r
    # bfloat16 weights of the full-size model stay under 64 MB (embeddings, attention, experts, head)
    h, e, w, s, v, n = r.hidden_size, r.num_local_experts, r.intermediate_size, r.shared_expert_intermediate_size, r.vocab_size, r.num_hidden_layers
    params = 2 * v * h + n * (4 * h * h + e * h + e * 3 * h * w + 3 * h * s + h + 2 * h) + h
    assert 2 * params <= 64 * 10**6
    with pytest.raises(ValueError, match="architecture"):
        Recipe(architecture="llama")
    with pytest.raises(ValueError, match="shared_expert_intermediate_size"):
        Recipe(shared_expert_intermediate_size=32)
    with pytest.raises(ValueError, match="save_dtype"):
        Recipe(save_dtype="float16")


def test_time_budget_schedule_decays_fully():
    r = replace(REFERENCE_MOE_2, time_budget_s=100.0, max_steps=1000, warmup_steps=10)
    assert lr_at(500, r, seconds=100.0) == pytest.approx(r.lr * r.min_lr_ratio)
    assert lr_at(500, r, seconds=50.0) < lr_at(500, replace(r, time_budget_s=0.0))  # time ahead of steps
    no_budget = replace(r, time_budget_s=0.0)
    mid = no_budget.warmup_steps + (no_budget.max_steps - no_budget.warmup_steps) // 2
    assert lr_at(mid, no_budget) == pytest.approx(r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi / 2))))


def test_min_top1_share_matches_brute_force():
    logits = tuple(torch.randn(50, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    ref = min((lg.argmax(-1) == e).float().mean().item() for lg in logits for e in range(8))
    assert min_top1_share(logits) == pytest.approx(ref)


def test_tiny_recipe_2_trains_resumes_and_writes_a_folder(tmp_path):
    r = tiny(tmp_path)
    full, tok, state = train(r, tmp_path / "full", progress=False, log=quiet)
    assert state["finished"] and state["step"] == 6
    adapter = get_adapter(full)
    assert adapter.family == "qwen2_moe" and adapter.num_experts == 64 and adapter.top_k == 8
    assert adapter.num_shared_experts == 1 and len(adapter.moe_layers(full)) == 8
    log = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert all(0 <= rec["min_top1_share"] <= 1 / 64 for rec in log)  # the lowest of 64 shares is at most uniform

    train(r, tmp_path / "killed", progress=False, log=quiet, stop_after=5)
    resumed, _, st2 = train(r, tmp_path / "killed", progress=False, log=quiet)
    assert st2["finished"] and st2["tokens_seen"] == state["tokens_seen"]
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name

    card = write_model_folder(full, tok, r, state, tmp_path / "out")
    assert card["test_tokens"] > 0 and len(card["expert_load"]) == 8 + 1
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(saved.parameters()).dtype == torch.bfloat16
    # the card measured the committed (bfloat16-rounded) weights, not the float32 ones
    again = corpus_perplexity(saved.float(), tok, r.dataset, "test", r.seq_len, 8, r.eval_sequences)
    assert again.perplexity == pytest.approx(card["test_perplexity"], rel=1e-5)
    text = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "Qwen2MoeForCausalLM" in text and ">= 0.31%" in text and "64 routed experts" in text
    assert min_expert_share_bar(64) == pytest.approx(0.2 / 64) and min_expert_share_bar(8) == 0.03


def test_time_budget_ends_training(tmp_path):
    r = tiny(tmp_path, max_steps=10_000, time_budget_s=1.0, checkpoint_every=1000)
    _, _, state = train(r, tmp_path / "w", progress=False, log=quiet)
    assert state["finished"] and state["step"] < 10_000 and state["train_seconds"] >= 1.0
    # finished runs stay finished: a second call trains nothing
    _, _, again = train(r, tmp_path / "w", progress=False, log=quiet)
    assert again["step"] == state["step"] and again["finished"]


def test_unknown_recipe_name_is_a_clear_cli_error(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "var_moe.cli", "train-reference", "--recipe", "reference-moe-9",
                          "--work-dir", str(tmp_path / "w")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--recipe" in out.stderr and "reference-moe-2" in out.stderr
    assert "Traceback" not in out.stderr
