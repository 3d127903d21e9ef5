"""`server.app.load_engine` with `--engine vllm` on the reference model: the loader picks vLLM's
engine class and the loaded `VllmHost` keeps the engine contract (server/host.py `StepHost`),
checked on the real object in a process of its own (vLLM keeps global state).
Runs in the vLLM environment only (skipped elsewhere). Test: `pytest tests/vllm_engine/test_vllm_host_contract.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (see make setup-vllm)")

SCRIPT = """
import json, sys
from server.app import load_engine
from server.host import BatchHost, Host, StepHost
from server.settings import ServerSettings
from server.vllm_engine import VllmEngine

host, engine_class = load_engine(ServerSettings(model=sys.argv[1], engine="vllm", dtype="float32",
                                                enforce_eager=True, max_model_len=256, max_batch_size=2))
print(json.dumps({"host": isinstance(host, Host), "step": isinstance(host, StepHost),
                  "batch": isinstance(host, BatchHost), "engine": engine_class is VllmEngine,
                  "available": host.available, "can_capture": host.can_capture}))
host.llm.engine_core.shutdown()
"""


def test_loader_picks_vllms_engine_and_its_host_keeps_the_contract(reference_model_dir):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(reference_model_dir)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"host": True, "step": True, "batch": False, "engine": True, "available": True,
                   "can_capture": False}
