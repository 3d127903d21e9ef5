"""`make gpu-check` (benchmarks/gpu_check.py) without a GPU: the clean exit on CPU, the table and the
runner with fake rows and modules, and the check modules' own code run on the CPU (`--device cpu`).

Nothing here says anything about CUDA: no GPU is available where this suite runs.
Run: `pytest tests/test_gpu_check.py` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import discover, format_table, run_checks, summary
from benchmarks.gpu_checks import GPUContext, row

REPO = Path(__file__).resolve().parent.parent


def run_script(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """The benchmark as its documented command runs it: `python -m benchmarks gpu_check ...`."""
    return subprocess.run([sys.executable, "-m", "benchmarks", "gpu_check", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_cleanly(tmp_path):
    out = tmp_path / "gpu.json"
    res = run_script("--output", str(out))
    assert res.returncode == 0, res.stderr
    assert "gpu-check needs CUDA" in res.stdout and "Nothing was run" in res.stdout
    assert "Traceback" not in res.stderr and not out.exists()


def test_table_shows_every_row_with_ok_marks():
    rows = [row("a", "agreement layer 0", 0.98765, ">= 0.9", True, "2048 tokens"),
            row("a", "perplexity ratio", 1.7, "<= 1.25", False, "broken?"),
            row("b", "tokens/s", 64.0, "-", None, "informational"),
            row("b", "skipped thing", None, "CUDA", None, "skipped")]
    table = format_table(rows).splitlines()
    assert table[0].split("|")[1:-1] == [c.ljust(len(c)) for c in table[0].split("|")[1:-1]]
    assert [c.strip() for c in table[0].strip("|").split("|")] == ["check", "metric", "value", "expect", "ok", "note"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [b[4] for b in body] == ["yes", "NO", "-", "-"]
    assert body[0][2] == "0.9877" and body[3][2] == "-"
    assert len({len(line) for line in table}) == 1  # aligned columns
    assert summary(rows) == {"rows": 4, "failed": 1, "passed": 1, "informational": 2}


def test_runner_turns_an_exception_into_a_failed_row_and_goes_on(tmp_path):
    def boom(ctx):
        raise RuntimeError("no bitsandbytes kernel for this GPU")

    modules = {"first": types.SimpleNamespace(run=boom),
               "second": types.SimpleNamespace(run=lambda ctx: [row("second", "m", 1.0, "= 1", True)])}
    ctx = GPUContext(model="m", device="cpu", num_samples=1, out_dir=tmp_path)
    rows = run_checks(modules, ctx, log=lambda *_: None)
    assert rows[0]["check"] == "first" and rows[0]["ok"] is False and "no bitsandbytes kernel" in rows[0]["note"]
    assert rows[1]["check"] == "second" and rows[1]["ok"] is True
    assert "RuntimeError" in (tmp_path / "first.traceback.txt").read_text()
    bad = {"bad": types.SimpleNamespace(run=lambda ctx: [{"check": "bad", "value": 1}])}
    with pytest.raises(ValueError, match="lacks"):
        run_checks(bad, ctx, log=lambda *_: None)


def test_discovery_finds_the_check_modules_by_name():
    found = discover()
    assert {"bf16_routing", "quantized", "server_cuda"} <= set(found)
    assert all(callable(m.run) for m in found.values())
    with pytest.raises(SystemExit, match="unknown --checks"):
        discover(["no_such_check"])


def test_the_checks_own_code_runs_on_the_cpu(tmp_path, reference_model_dir):
    """`--device cpu`: bf16 routing and capture, the server check; quantization rows are skipped."""
    out = tmp_path / "gpu.json"
    res = run_script("--device", "cpu", "--num-samples", "4", "--model", str(reference_model_dir), "--output", str(out),
                     timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["summary"]["failed"] == 0 and result["environment"]["device"] == "cpu"
    metrics = {(r["check"], r["metric"]) for r in rows}
    assert ("bf16_routing", "bf16 = fp32 top-k set, layer 0") in metrics
    assert ("server_cuda", "greedy /v1/generate = in-process generate()") in metrics
    assert all(r["ok"] is None and "skipped" in r["note"] for r in rows if r["check"] == "quantized")
    agreement = [r["value"] for r in rows if r["metric"].startswith("bf16 = fp32")]
    assert len(agreement) == 4 and all(0.0 <= a <= 1.0 for a in agreement)
    assert "| check" in res.stdout  # the table went to stdout
