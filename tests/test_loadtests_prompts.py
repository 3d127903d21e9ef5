"""Prompt preparation for the load tests: deterministic, test split only, cut to the model's context."""

from __future__ import annotations

import json

import pytest

from loadtests.prompts import build_prompts, fit_to_model, read_prompts, write_prompts
from var_moe.corpus import split_of


def test_prompts_are_deterministic_and_from_the_test_split():
    a = build_prompts("stdlib", "test", num=30, seed=3)
    b = build_prompts("stdlib", "test", num=30, seed=3)
    assert a == b and len(a) == 30
    assert {p["kind"] for p in a} <= {"short", "long"}
    for p in a:
        assert split_of(p["id"].rsplit("@", 1)[0]) == "test"
        assert len(p["text"]) >= 20


def test_local_dataset_and_round_trip(tmp_path):
    src = tmp_path / "docs.jsonl"
    with src.open("w") as fh:
        for i in range(200):
            fh.write(json.dumps({"text": "\n".join(f"line {i} {j} " + "x" * 40 for j in range(40))}) + "\n")
    prompts = build_prompts(str(src), "test", num=10, seed=0)
    path = write_prompts(prompts, tmp_path / "p.jsonl")
    assert read_prompts(path) == prompts


def test_bad_prompt_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_prompts(bad)
    bad.write_text('{"prompt": "no text field"}\n')
    with pytest.raises(ValueError, match="'text'"):
        read_prompts(bad)
    with pytest.raises(ValueError, match="--num"):
        build_prompts(num=0)


def test_fit_to_model_respects_the_context(tmp_path):
    from transformers import AutoTokenizer

    from analysis_jobs.fixtures import tiny_var_model

    model = tiny_var_model(tmp_path / "m")  # context 512
    prompts = [{"id": "x", "kind": "long", "text": "def f(x):\n    return x * 2\n" * 200}, {"id": "y", "kind": "short", "text": "a = 1"}]
    fitted = fit_to_model(prompts, model, reserve=100)
    tok = AutoTokenizer.from_pretrained(str(model))
    assert len(tok(fitted[0]["text"])["input_ids"]) <= 512 - 1 - 100
    assert fitted[1]["text"] == "a = 1"  # short prompts stay as they are
