"""Reference training: a tiny recipe trains, checkpoints, and a killed run resumes exactly.

Also checks the per-layer balancing loss against a brute-force reference and the recipe's JSON round trip."""

import json

import pytest
import torch

from var_moe.reference.recipe import Recipe
from var_moe.reference.train import per_layer_balance_loss, train


def tiny_recipe(tmp_path, **kw):
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        words = ["def", "return", "import", "class", "self", "value", "for", "in", "if", "else", "None", "print"]
        g = torch.Generator().manual_seed(0)
        with corpus.open("w") as fh:
            for i in range(60):
                idx = torch.randint(0, len(words), (80,), generator=g).tolist()
                fh.write(json.dumps({"text": " ".join(words[j] for j in idx)}) + "\n")
    base = dict(dataset=str(corpus), vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, max_position_embeddings=32,
                seq_len=16, batch_size=4, max_steps=6, warmup_steps=2, checkpoint_every=2, threads=1)
    base.update(kw)
    return Recipe(**base)


def test_recipe_json_round_trip_and_validation():
    r = Recipe()
    assert Recipe.from_json(r.to_json()) == r
    with pytest.raises(ValueError, match="unknown recipe fields"):
        Recipe.from_json('{"bogus": 1}')
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        Recipe(num_experts_per_tok=9)


def test_balance_loss_matches_brute_force():
    logits = [torch.randn(20, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    got = per_layer_balance_loss(tuple(logits), top_k=2, top1_weight=0.5)
    ref = []
    for lg in logits:
        p = torch.softmax(lg, -1)
        top = p.topk(2, -1).indices
        slots = [(top == e).sum().item() / top.numel() for e in range(4)]
        top1 = [(top[:, 0] == e).sum().item() / 20 for e in range(4)]
        ref.append(4 * sum((0.5 * slots[e] + 0.5 * top1[e]) * p[:, e].mean().item() for e in range(4)))
    assert abs(float(got) - sum(ref) / 3) < 1e-6


def test_killed_run_resumes_to_identical_weights(tmp_path):
    r = tiny_recipe(tmp_path)
    full, _, state_full = train(r, tmp_path / "full", progress=False, log=lambda s: None)
    train(r, tmp_path / "killed", progress=False, log=lambda s: None, stop_after=5)  # killed after step 5, ckpt at 4
    resumed, _, state_res = train(r, tmp_path / "killed", progress=False, log=lambda s: None)
    assert state_res["step"] == state_full["step"] == 6
    assert state_res["tokens_seen"] == state_full["tokens_seen"]
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    lines = (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_other_recipe_in_same_work_dir_is_refused(tmp_path):
    r = tiny_recipe(tmp_path, max_steps=2)
    train(r, tmp_path / "w", progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="different recipe"):
        train(tiny_recipe(tmp_path, lr=1e-4), tmp_path / "w", progress=False, log=lambda s: None)


def test_final_balancing_stage_resumes_and_can_be_added_to_a_finished_run(tmp_path):
    r = tiny_recipe(tmp_path, max_steps=4, finish_steps=3, finish_balance_coef=2.0)
    full, _, state_full = train(r, tmp_path / "full", progress=False, log=lambda s: None)
    assert (state_full["step"], state_full["finish_step"]) == (4, 3)
    lines = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert [(x["step"], x["finish_step"]) for x in lines] == [(1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (4, 2), (4, 3)]
    assert {x["lr"] for x in lines[4:]} == {r.lr * r.min_lr_ratio}
    # a finished main stage trained on with the final stage added (training on) ends where one run ends,
    # also when killed inside the final stage
    train(tiny_recipe(tmp_path, max_steps=4), tmp_path / "later", progress=False, log=lambda s: None)
    train(r, tmp_path / "later", progress=False, log=lambda s: None, stop_after=5)  # killed after finish step 1 (checkpoint at main step 4)
    resumed, _, state_res = train(r, tmp_path / "later", progress=False, log=lambda s: None)
    assert (state_res["step"], state_res["finish_step"]) == (4, 3)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    lines = [json.loads(line) for line in (tmp_path / "later" / "train_log.jsonl").read_text().splitlines()]
    assert [(x["step"], x["finish_step"]) for x in lines] == [(1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (4, 2), (4, 3)]
