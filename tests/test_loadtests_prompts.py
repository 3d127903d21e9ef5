"""Load-test prompts: the built-in ones and the JSONL reader (loadtests/, HTTP only), and prompt files
cut from a corpus (analysis_jobs/prompt_file.py): deterministic, test split only, cut to the model's
context. Also: loadtests/ imports none of var_moe, server, analysis_jobs, torch, transformers.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis_jobs.prompt_file import build_prompts, fit_to_model, main, write_prompts
from loadtests.prompts import BUILTIN_PROMPTS, LONG_MIN_CHARS, prompts_from_env, read_prompts
from var_moe.corpus import split_of

LOADTESTS = Path(__file__).resolve().parent.parent / "loadtests"
FORBIDDEN = {"var_moe", "server", "analysis_jobs", "benchmarks", "torch", "transformers"}


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


def test_builtin_prompts_cover_both_kinds_and_fit_the_reference_context(reference_model_dir):
    from transformers import AutoTokenizer

    assert {p["kind"] for p in BUILTIN_PROMPTS} == {"short", "long"}
    assert len({p["id"] for p in BUILTIN_PROMPTS}) == len(BUILTIN_PROMPTS)
    tok = AutoTokenizer.from_pretrained(str(reference_model_dir))
    context = 512
    for p in BUILTIN_PROMPTS:  # room for the locustfile's default 48 new tokens
        assert 0 < len(tok(p["text"])["input_ids"]) <= context - 1 - 48, p["id"]
    assert prompts_from_env(None) == [dict(p) for p in BUILTIN_PROMPTS]


def test_a_prompt_file_overrides_the_builtin_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"text": "x = 1"}) + "\n" + json.dumps({"text": "y" * LONG_MIN_CHARS}) + "\n")
    rows = prompts_from_env(str(f))
    assert [r["kind"] for r in rows] == ["short", "long"]  # defaulted by length
    f.write_text(json.dumps({"text": "x", "kind": "medium"}) + "\n")
    with pytest.raises(ValueError, match="'kind'"):
        read_prompts(f)


def test_prompt_file_cli_writes_what_the_reader_reads(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["--num", "12", "--seed", "1", "--output", str(out)]) == 0
    rows = read_prompts(out)
    assert len(rows) == 12 and "wrote 12 prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--num", "0", "--output", str(out)])
    assert exc.value.code == 2


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_loadtests_import_none_of_the_library():
    files = sorted(LOADTESTS.glob("*.py"))
    assert len(files) >= 4
    for f in files:
        bad = _imported_modules(f) & FORBIDDEN
        assert not bad, f"{f.name} imports {sorted(bad)}"
    # and at run time: importing the runner and the prompts pulls in none of them
    code = ("import sys, loadtests.run, loadtests.prompts; "
            f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=LOADTESTS.parent)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
