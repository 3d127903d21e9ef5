"""`varmoe serve --engine vllm` as `make serve-vllm` runs it: no dtype, no memory setting.

vLLM picks the dtype itself (bfloat16 for the float32 reference model on a CPU with bf16 support,
and on GPUs); the committed tables, certified in float32, must still be recognised (the
fingerprint is the stored checkpoint's), measured in the served dtype at start-up and reported
in /var/status, and serve table rows (fast decisions in /metrics). The KV cache is sized by the
server's own default, not vLLM's (which reserves nearly all memory), so the server starts while
another process holds 3 GB. VLLM_CPU_KVCACHE_SPACE, which `make test` sets for the other vLLM
tests, is removed from the server's environment here.
Runs in the vLLM environment only. Test: `pytest tests/vllm_engine/test_vllm_default_serve.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (see make setup-vllm)")

from server_helpers import metric  # noqa: E402  (tests/, on the path via conftest)

from analysis_jobs.server_process import ManagedServer  # noqa: E402
from server.cpu_affinity import compute_cores  # noqa: E402
from var_moe.var.served_dtype import certified_dtype  # noqa: E402
from var_moe.var.tables import VARTables  # noqa: E402

HOLD_3GB = "import sys, time; b = bytearray(3 << 30); b[::4096] = b'x' * len(b[::4096]); sys.stdout.write('held\\n'); sys.stdout.flush(); time.sleep(3600)"


def test_default_serve_vllm_serves_var_from_committed_tables(reference_model_dir, tmp_path):
    hog = subprocess.Popen([sys.executable, "-c", HOLD_3GB], stdout=subprocess.PIPE, text=True)
    proc = None
    try:
        assert hog.stdout.readline().strip() == "held"  # 3 GB resident before the server starts
        proc = ManagedServer(None, args=["--engine", "vllm"], env={"VLLM_CPU_KVCACHE_SPACE": None},
                             log_path=tmp_path / "server.log")
        proc.wait_ready(timeout_s=900)
        with httpx.Client(base_url=proc.url, timeout=120) as c:
            status = c.get("/var/status").json()
            assert status["mode"] == "var" and status["var"]["engine"] == "vllm"
            check = status["var"]["dtype_check"]
            tables = VARTables.load(reference_model_dir / "var" / "var_tables.safetensors")
            assert check["certified"] == certified_dtype(tables.metadata, reference_model_dir) == "float32"
            assert check["served"] in ("bfloat16", "float16", "float32")
            assert check["ok"] is True
            if check["served"] != "float32":  # measured on table rows of every layer with entries
                assert check["measured"] is True
                assert {int(l) for l, v in check["layers"].items() if v["rows"] > 0} == set(tables.sizes())
            r = c.post("/v1/generate", json={"prompt": "import os\nimport sys\n", "max_new_tokens": 16})
            assert r.status_code == 200 and r.json()["routing"]["fast"] > 0
            assert metric(c.get("/metrics").text, "varmoe_routing_decisions_total", mode="var", tier="fast") > 0
            # vLLM binds its compute threads (auto: leaving cores for other processes); the server's own
            # threads run on the other cores (server/cpu_affinity.py)
            bound = compute_cores(proc.pid)
            if bound and bound < os.sched_getaffinity(0):
                own = set().union(*(os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{proc.pid}/task")))
                assert own and not own & bound, (own, bound)
        log = (tmp_path / "server.log").read_text(errors="replace")
        assert "Explicitly set (0.25/" in log  # the server's KV-cache default, not vLLM's near-total one
    finally:
        if proc is not None:
            proc.stop()
        hog.kill()
