"""End to end on a tiny model on disk: capture -> `varmoe validate` / `predictability` / `plot`.

The model folder (tiny random Mixtral + a small BPE tokenizer) and a .txt corpus are written to a
temporary folder; statistics are captured with `RouterAnalyzer`, the rest runs through the CLI.
Run: `pytest tests/test_validation_cli.py`.
"""

import json
import random

import pytest
import torch

from var_moe.cli import main
from var_moe.corpus import split_of

torch.set_num_threads(1)

WORDS = ("the router picks experts for every token def return class import self value list dict none "
         "for in if else while with data batch layer expert token cache table").split()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from var_moe.reference.tokenizer import train_tokenizer
    from var_moe.tiny import tiny_model

    root = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS[: 8 + rng.randrange(len(WORDS) - 8)]) for _ in range(60)) + "\n"
             for _ in range(80)]
    corpus = root / "corpus"
    corpus.mkdir()
    for i, t in enumerate(texts):
        (corpus / f"doc{i:03d}.txt").write_text(t)
    splits = {split_of(f"doc{i:03d}.txt") for i in range(len(texts))}
    assert {"calibration", "test"} <= splits
    model_dir = root / "model"
    tok = train_tokenizer(texts, 300, model_dir)
    model = tiny_model("mixtral", seed=1, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=256)
    model.save_pretrained(model_dir)
    return root, model_dir, corpus


@pytest.fixture(scope="module")
def stats_file(toy):
    from var_moe.capture.analyzer import RouterAnalyzer
    from var_moe.corpus import iter_batches
    from var_moe.loading import load_model

    root, model_dir, corpus = toy
    model, tok = load_model(str(model_dir))
    analyzer = RouterAnalyzer(model, tokenizer=tok)
    for ids, mask in iter_batches(tok, str(corpus), "train", max_length=64, batch_size=8, num_samples=40):
        analyzer.analyze_batch(ids, mask)
    path = root / "stats.parquet"
    analyzer.write_parquet(path, {"dataset": str(corpus), "split": "train"})
    return path


def test_validate_cli_writes_text_and_json(stats_file, tmp_path, capsys):
    out, js = tmp_path / "report.txt", tmp_path / "report.json"
    assert main(["validate", "--input", str(stats_file), "--output", str(out), "--json", str(js),
                 "--n-boot", "50", "--equal-n", "5"]) == 0
    text = out.read_text()
    rep = json.loads(js.read_text())
    assert "maximum ln E = 1.3863" in text  # 4 experts
    assert len(rep["criteria"]) == 4 and all(c["name"] in text for c in rep["criteria"])
    assert sorted(rep["layers"]) == ["0", "1"]
    assert rep["consecutive_rates"] is not None
    assert "PASS" in capsys.readouterr().out or "FAIL" in text


def test_predictability_cli_then_validate_and_plot(toy, stats_file, tmp_path):
    root, model_dir, corpus = toy
    held = tmp_path / "heldout.json"
    assert main(["predictability", "--model", str(model_dir), "--dataset", str(corpus), "--num-samples", "12",
                 "--max-length", "48", "--batch-size", "4", "--output", str(held), "--control", "random-init",
                 "--control-seed", "5"]) == 0
    h = json.loads(held.read_text())
    assert {r["model"] for r in h["rows"]} == {"trained", "control"}
    assert h["num_tokens_test"] > 0 and h["num_tokens_calibration"] > 0
    for r in h["rows"]:
        assert 0.0 <= r["exact"] <= r["overlap"] + 1e-12 <= 1.0 + 1e-12
        assert 0.0 <= r["exact_ci95"][0] <= r["exact_ci95"][1] <= 1.0
    assert sum(h["per_document"]["tokens_LD"][0]) == h["num_tokens_test"]  # compact last line parses too
    rep_path = tmp_path / "r.txt"
    assert main(["validate", "--input", str(stats_file), "--output", str(rep_path), "--heldout", str(held),
                 "--n-boot", "20"]) == 0
    text = rep_path.read_text()
    assert "held-out predictability" in text and "H5:" in text and "H3b:" in text
    # every layer row of the held-out table shows trained / control (margin) from the JSON rows
    t0 = next(r for r in h["rows"] if r["model"] == "trained" and r["layer"] == 0 and r["predictor"] == "token_table")
    c0 = next(r for r in h["rows"] if r["model"] == "control" and r["layer"] == 0 and r["predictor"] == "token_table")
    assert f"{100 * t0['exact']:.1f}% / {100 * c0['exact']:.1f}% ({100 * (t0['exact'] - c0['exact']):+.1f})" in text
    figs = tmp_path / "figs"
    assert main(["plot", "--input", str(stats_file), "--output-dir", str(figs), "--heldout", str(held)]) == 0
    names = {p.name for p in figs.iterdir()}
    for stem in ("frequency_vs_entropy", "entropy_distribution", "consistency_vs_frequency", "coverage_curves",
                 "token_expert_heatmap", "consecutive_rates", "heldout_predictability"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    assert all((figs / n).stat().st_size > 1000 for n in names)


def test_cli_errors_name_the_flag(tmp_path, capsys):
    assert main(["validate", "--input", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "r.txt")]) == 2
    assert "missing.parquet" in capsys.readouterr().err
    bad = tmp_path / "h.json"
    bad.write_text("[1, 2]")
    assert main(["plot", "--input", "x.parquet", "--output-dir", str(tmp_path), "--heldout", str(bad)]) == 2
    assert "--heldout" in capsys.readouterr().err
    assert main(["predictability", "--output", str(tmp_path / "o.json"), "--split", "calibration"]) == 2
    assert "--calibration-split" in capsys.readouterr().err
