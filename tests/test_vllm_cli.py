"""`varmoe serve --engine ...`: a clear CLI error (exit 2, naming the flag) for an unknown engine,
a negative --vllm-pair-capacity, and for `--engine vllm` where vLLM is not installed (the main environment). Test:
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


def test_vllm_engine_arguments_pass_through_what_the_operator_set():
    from server.settings import ServerSettings
    from server.vllm_host import engine_args

    kw = engine_args(ServerSettings(engine="vllm", tensor_parallel_size=2, max_model_len=512, max_batch_size=16))
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 512 and kw["max_num_seqs"] == 16
    assert "gpu_memory_utilization" not in kw and "quantization" not in kw  # vLLM's defaults stand
    # vLLM's own statistics are off unless asked for (as `--disable-log-stats` on vLLM's server)
    assert kw["disable_log_stats"] is True
    assert engine_args(ServerSettings(engine="vllm", vllm_log_stats=True))["disable_log_stats"] is False


def test_kv_cache_default_fits_the_batch_and_names_its_setting(reference_model_dir):
    import json

    from server.settings import ServerSettings
    from server.vllm_host import GiB, MIN_KV_CACHE_BYTES, kv_cache_bytes
    from var_moe.errors import InvalidInputError

    cfg = json.loads((reference_model_dir / "config.json").read_text())
    settings = ServerSettings(engine="vllm", model=str(reference_model_dir), max_batch_size=16)
    need = (2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
            * 4 * cfg["max_position_embeddings"] * 16)
    assert kv_cache_bytes(settings, on_cpu=True) == max(MIN_KV_CACHE_BYTES, int(need * 1.25))
    assert kv_cache_bytes(settings, on_cpu=False) is None  # GPUs: vLLM's --gpu-memory-utilization
    explicit = ServerSettings(engine="vllm", model=str(reference_model_dir), kv_cache_gib=1.5)
    assert kv_cache_bytes(explicit, on_cpu=False) == int(1.5 * GiB)
    huge = ServerSettings(engine="vllm", model=str(reference_model_dir), max_model_len=10**9, max_batch_size=256)
    with pytest.raises(InvalidInputError, match="--kv-cache-gib"):
        kv_cache_bytes(huge, on_cpu=True)


def test_negative_pair_capacity_is_a_flag_error():
    r = serve("--engine", "vllm", "--vllm-pair-capacity", "-1")
    assert r.returncode == 2 and "--vllm-pair-capacity" in r.stderr and "Traceback" not in r.stderr


def test_data_parallel_is_refused_with_the_way_to_scale_out():
    # vLLM's synchronous engine reaches data-parallel rank 0 only: refused before anything loads
    r = serve("--engine", "vllm", "--data-parallel-size", "2")
    assert r.returncode == 2 and "--data-parallel-size" in r.stderr and "load balancer" in r.stderr
    assert "Traceback" not in r.stderr
