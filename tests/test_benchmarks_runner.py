"""The benchmarks' one entry point: `python -m benchmarks` lists every benchmark, an unknown name is
an error naming the known ones, and every benchmark takes the one output flag `--output`.
Run: `pytest tests/test_benchmarks_runner.py` (seconds; imports each benchmark, runs none).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import benchmarks, main

REPO = Path(__file__).resolve().parent.parent


def test_lists_every_module_with_main(capsys):
    known = benchmarks()
    on_disk = {p.stem for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert set(known) == on_disk - {"locust_completions", "cpu_time"}  # the locustfile and a helper module
    assert main([]) == 2
    listed = capsys.readouterr().out
    assert all(name in listed for name in known)


def test_unknown_name_is_an_error(capsys):
    assert main(["var_decode"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'var_decode'" in err and "var_decode_steps" in err


@pytest.mark.parametrize("name", sorted(benchmarks()))
def test_every_benchmark_takes_output(name):
    res = subprocess.run([sys.executable, "-m", "benchmarks", name, "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "--output" in res.stdout and "--out " not in res.stdout and "--json" not in res.stdout
