"""Evaluation pipeline end to end on a tiny saved model: capture (calibration) -> build-tables ->
evaluate baseline / var -> compare, plus the paired bootstrap against a direct computation.
Run: `pytest tests/test_var_eval.py`."""

import json
import math
import random

import numpy as np
import pytest
import torch

from var_moe.cli import main
from var_moe.var.config import VARConfig
from var_moe.var.evaluate import paired_bootstrap

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from var_moe.reference.tokenizer import train_tokenizer
    from var_moe.tiny import tiny_model

    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "value", "x", "y", "(", ")", ":"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(200)]
    with open(root / "docs.jsonl", "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    tok = train_tokenizer(docs, 300, root / "model")
    model = tiny_model("mixtral", seed=0, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model.save_pretrained(root / "model")
    return root


COMMON = ["--max-length", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def built(tiny_dir):
    """The calibration capture and the tables built from it (every test that needs them asks for this)."""
    m, data, out = str(tiny_dir / "model"), str(tiny_dir / "docs.jsonl"), tiny_dir
    # a random tiny router is nearly uniform (max entropy ln 4): loose thresholds so tables are not empty
    VARConfig(frequency_threshold=3, entropy_threshold=1.4, entropy_relative=False, target_agreement=0.2).to_json(out / "cfg.json")
    assert main(["capture", "--model", m, "--dataset", data, *COMMON, "--split", "calibration",
                 "--output", str(out / "calib.parquet"), "--no-progress"]) == 0
    assert main(["build-tables", "--model", m, "--routing-stats", str(out / "calib.parquet"), "--config", str(out / "cfg.json"),
                 "--output", str(out / "tables.safetensors")]) == 0
    return tiny_dir


def test_pipeline_end_to_end(built, capsys):
    m, data, out = str(built / "model"), str(built / "docs.jsonl"), built
    common = ["--model", m, "--dataset", data, *COMMON]
    assert (out / "tables.json").exists()
    ev = ["evaluate", *common, "--split", "test", "--num-samples", "12", "--repeats", "2", "--bootstrap", "200"]
    assert main([*ev, "--mode", "baseline", "--output", str(out / "base.json")]) == 0
    assert main([*ev, "--mode", "var", "--routing_stats", str(out / "calib.parquet"), "--config", str(out / "cfg.json"),
                 "--output", str(out / "var.json")]) == 0
    assert main([*ev, "--mode", "var", "--tables", str(out / "tables.safetensors"), "--adaptive-k",
                 "--output", str(out / "var_k.json")]) == 0
    capsys.readouterr()
    assert main(["compare", str(out / "base.json"), str(out / "var.json")]) == 0
    text = capsys.readouterr().out
    for needle in ("Perplexity:", "Speedup:", "VAR Routing Distribution:", "Success Criteria:", "secondary"):
        assert needle in text
    assert main(["evaluate", "--compare", str(out / "base.json"), str(out / "var.json")]) == 0  # the seed's spelling
    assert capsys.readouterr().out == text
    base = json.loads((out / "base.json").read_text())
    var = json.loads((out / "var.json").read_text())
    # the paired baseline inside the VAR run is the same computation as the baseline run
    assert var["paired"]["baseline_evaluation"]["perplexity"] == pytest.approx(base["evaluation"]["perplexity"], rel=1e-9)
    # the default scoring is sliding windows, half a window apart, and the output says so
    assert var["scoring"] == base["scoring"]
    assert var["scoring"]["method"] == "sliding windows" and var["scoring"]["stride"] == 16
    assert var["scoring"]["scored_tokens"] == var["evaluation"]["predicted_tokens"] > 0
    dist = var["var_stats"]["overall"]["routing_distribution"]
    assert sum(dist.values()) == pytest.approx(1.0)
    assert dist["fast"] > 0 and var["agreement"]["fast"]["n"] > 0
    assert set(var["throughput"]["latency"]) >= {"p50", "p95", "p99"}
    assert sum(json.loads((out / "tables.json").read_text())["sizes"].values()) > 0


def test_compare_refuses_swapped_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"mode": "var", "evaluation": {}, "throughput": {}}))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 2


def test_tables_for_another_model_refused(built, tmp_path):
    tiny_dir = built
    from var_moe.tiny import tiny_model

    other = tiny_model("mixtral", seed=7, vocab_size=300)
    other.save_pretrained(tmp_path / "m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / f).write_bytes((tiny_dir / "model" / f).read_bytes())
    code = main(["evaluate", "--mode", "var", "--model", str(tmp_path / "m"), "--dataset", str(tiny_dir / "docs.jsonl"),
                 "--tables", str(tiny_dir / "tables.safetensors"), "--num-samples", "2", "--output", str(tmp_path / "o.json")])
    assert code == 2


def test_build_tables_chooses_on_the_training_split(built, tmp_path, capsys):
    """--choose-evidence: sets chosen on (spread) training documents, certified on every calibration
    document; the metadata says so; a test or calibration choosing split is refused, naming the flag."""
    tiny_dir = built
    m, cfg = str(tiny_dir / "model"), str(tiny_dir / "cfg.json")
    base = ["build-tables", "--model", m, "--routing-stats", str(tiny_dir / "calib.parquet"), "--config", cfg]
    train_ev = tmp_path / "train_ev.safetensors"
    assert main([*base, "--output", str(tmp_path / "t.safetensors"), "--choose-evidence", str(train_ev),
                 "--choose-max-docs", "40"]) == 0
    meta = json.loads((tmp_path / "t.json").read_text())
    assert meta["choosing"]["split"] == "train" and meta["choosing"]["documents"] == 40
    assert meta["certifying"]["split"] == "calibration" and meta["source_split"] == "calibration"
    assert meta["certifying"]["documents"] == sum(meta["source_documents"])  # every calibration document certifies
    assert train_ev.exists() and "choosing evidence (train)" in capsys.readouterr().out
    for split in ("test", "calibration"):
        code = main([*base, "--output", str(tmp_path / "x.safetensors"), "--choose-evidence", str(tmp_path / "x.st"),
                     "--choose-split", split])
        assert code == 2 and "--choose-split" in capsys.readouterr().err
    assert not (tmp_path / "x.st").exists()


def test_paired_bootstrap_point_and_ci():
    rng = np.random.default_rng(1)
    n = rng.integers(10, 100, size=40).astype(float)
    base = n * rng.uniform(2.0, 3.0, size=40)
    var = base * 1.01
    r = paired_bootstrap(base, n, var, n, resamples=500, seed=0)
    assert r["diff_pct"] == pytest.approx(100 * (math.exp(var.sum() / n.sum()) / math.exp(base.sum() / n.sum()) - 1))
    lo, hi = r["ci95_pct"]
    assert lo <= r["diff_pct"] <= hi and r["documents"] == 40
