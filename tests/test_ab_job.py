"""`varmoe ab-test` end to end on a real server (reference model with VAR files, else a tiny one).

Short and bounded (seconds of load). The job's perplexities are checked against the model run
in-process on the same texts, and its criteria against values recomputed from its raw numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from analysis_jobs.ab_test import ABConfig, criteria, perplexity_texts
from analysis_jobs.fixtures import servable_var_model


@pytest.fixture(scope="module")
def ab_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ab")
    model = servable_var_model(tmp)
    out = tmp / "report"
    cmd = [sys.executable, "-m", "var_moe.cli", "ab-test", "--model", str(model), "--duration", "8", "--users", "2",
           "--sample-every", "2", "--ppl-texts", "4", "--ppl-chars", "600", "--max-new", "4,8", "--n-boot", "200",
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, out, json.loads((out / "ab_test.json").read_text()), proc.stdout


def test_report_files_and_criteria(ab_run):
    _, out, res, stdout = ab_run
    md = (out / "ab_test.md").read_text()
    for name in ("throughput", "latency", "tiers", "perplexity"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0 and (out / "figures" / f"{name}.pdf").exists()
        assert f"figures/{name}.png" in md
    assert [c["name"] for c in res["criteria"]] == ["quality preserved", "speedup", "learned routing"]
    for c in res["criteria"]:
        assert isinstance(c["pass"], bool)
        assert ("PASS" if c["pass"] else "FAIL") in stdout
    assert (out / "run" / "locust_stats.csv").exists() and (out / "run" / "locust.html").exists()


def test_both_modes_served_without_errors(ab_run):
    res = ab_run[2]
    req = res["requests"]
    assert req["by_mode"]["var"] > 0 and req["by_mode"]["baseline"] > 0
    assert req["status_5xx"] == 0
    assert res["throughput"]["windows"], "no /metrics windows were sampled"
    # tier shares of VAR requests come from the per-request routing counts
    t = res["tiers"]["var_requests_under_load"]
    assert t["decisions"] > 0 and sum(t[k] for k in ("fast", "learned")) == pytest.approx(1.0)
    assert res["tiers"]["baseline_requests_under_load"]["learned"] == pytest.approx(1.0)


def test_criteria_follow_from_the_raw_numbers(ab_run):
    res = ab_run[2]
    per = res["perplexity"]["per_text"]
    tokens = sum(p["tokens"] for p in per)
    ratio = math.exp(sum(p["tokens"] * (p["nll_var"] - p["nll_baseline"]) for p in per) / tokens)
    assert res["perplexity"]["ratio"] == pytest.approx(ratio)
    q, s, learned = res["criteria"]
    assert q["pass"] == (ratio - 1 < 0.01)
    sw = res["throughput"]["service_windows"]
    pairs = [(w["var"], w["baseline"]) for w in sw if w["var"] is not None and w["baseline"] is not None]
    want = sum(a for a, _ in pairs) / sum(b for _, b in pairs)
    assert s["value"] == pytest.approx(want) and s["pass"] == (want >= 1.2)
    assert learned["value"] == pytest.approx(res["tiers"]["var_requests_under_load"]["learned"])


def test_baseline_perplexity_matches_the_model_in_process(ab_run):
    from analysis_jobs.prompt_file import fit_to_model
    from var_moe.loading import load_model

    model_dir, _, res, _ = ab_run
    texts = perplexity_texts("stdlib", 4, 600)
    texts = [p["text"] for p in fit_to_model([{"text": t} for t in texts], model_dir, reserve=0)]
    model, tok = load_model(str(model_dir))
    torch.set_num_threads(1)
    for text, item in zip(texts, res["perplexity"]["per_text"]):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(1, ids[0, 1:, None]).mean().item()
        assert item["tokens"] == ids.shape[1] - 1
        assert item["nll_baseline"] == pytest.approx(nll, rel=1e-3)


def test_criteria_rules():
    ppl = {"ratio": 1.005, "ratio_lo": 1.0, "ratio_hi": 1.01}
    c = criteria(ppl, {"ratio": 1.3, "lo": 1.1, "hi": 1.5}, 0.10)
    assert [x["pass"] for x in c] == [True, True, True]
    c = criteria({**ppl, "ratio": 1.02}, {"ratio": None}, None)
    assert [x["pass"] for x in c] == [False, False, False]


def test_config_validation():
    with pytest.raises(ValueError, match="--users"):
        ABConfig(users=1)
    with pytest.raises(ValueError, match="--duration"):
        ABConfig(duration_s=0)


def test_cli_refuses_remote_url():
    proc = subprocess.run([sys.executable, "-m", "var_moe.cli", "ab-test", "--url", "http://example.com:8000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "loopback" in proc.stderr and "Traceback" not in proc.stderr


def test_report_says_how_modes_share_batches_on_each_engine(ab_run):
    """The builtin engine alternates single-mode batches; the vLLM engine mixes modes row by row."""
    from analysis_jobs.ab_report import markdown

    res = ab_run[2]
    assert "Batches hold one mode and alternate" in markdown(res)  # the builtin server ran this job
    on_vllm = {**res, "var_status": {**res["var_status"], "var": {**res["var_status"]["var"], "engine": "vllm"}}}
    md = markdown(on_vllm)
    assert "both modes share every batch, row by row" in md and "Batches hold one mode" not in md
