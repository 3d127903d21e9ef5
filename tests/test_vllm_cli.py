"""`varmoe serve --engine ...`: a clear CLI error (exit 2, naming the flag) for an unknown engine,
and for `--engine vllm` where vLLM is not installed (the main environment). Test:
`pytest tests/test_vllm_cli.py` (seconds).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from analysis_jobs.server_process import REPO_ROOT


def serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "var_moe.cli", "serve", "--port", "0", *flags], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_unknown_engine_is_a_flag_error():
    r = serve("--engine", "tgi")
    assert r.returncode == 2 and "--engine" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_says_how_to_get_it():
    r = serve("--engine", "vllm")
    assert r.returncode == 2 and "make setup-vllm" in r.stderr and "Traceback" not in r.stderr
