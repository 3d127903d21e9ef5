"""Helpers that start a real server in a subprocess (tests, benchmark), and a tiny servable model.

- `free_port()`: a free TCP port on 127.0.0.1.
- `tiny_model_dir(out_dir)`: a seeded tiny Mixtral plus a byte-level BPE tokenizer trained on
  var_moe's own source files, saved as a loadable folder (used while the reference model is absent).
- `servable_model_dir(tmp)`: the reference model when it is present, else a tiny one.
- `var_args(model_dir, tmp)`: serve flags giving the model VAR with shadow checks (tests).
- `ServerProcess(model_dir, env=..., args=...)`: `varmoe serve` as a subprocess on a free port;
  waits for /readyz; `stop()` sends SIGTERM (graceful drain) and returns the exit code.
Test: used by `pytest tests/test_server_*.py` and `python benchmarks/server_throughput.py`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from var_moe.loading import REFERENCE_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(out_dir: str | Path, seed: int = 0, vocab_size: int = 512) -> Path:
    from var_moe.reference.tokenizer import train_tokenizer
    from var_moe.tiny import tiny_model

    out = Path(out_dir)
    texts = [p.read_text() for p in sorted((REPO_ROOT / "var_moe").rglob("*.py"))]
    tok = train_tokenizer(texts, vocab_size, out)
    model = tiny_model("mixtral", seed, vocab_size=len(tok), max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out)
    return out


def servable_model_dir(tmp: str | Path) -> Path:
    if (REFERENCE_MODEL_DIR / "config.json").exists() and (REFERENCE_MODEL_DIR / "tokenizer.json").exists():
        return REFERENCE_MODEL_DIR
    return tiny_model_dir(Path(tmp) / "tiny-moe")


class ServerProcess:
    """`varmoe serve` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, model_dir: str | Path, args: list[str] | None = None, env: dict[str, str] | None = None,
                 threads: int = 1, log_path: str | Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "var_moe.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--threads", str(threads), "--log-level", "warning", *(args or [])]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads), **(env or {})}
        self.log_path = Path(log_path) if log_path else None
        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=self._log)

    def wait_ready(self, timeout_s: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout_s}s; log: {self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def calibration_stats(model_dir: str | Path, out_path: str | Path, num_docs: int = 40, max_length: int = 128) -> Path:
    """Phase 1 statistics of a (tiny) model on var_moe's own sources, marked as the calibration split.

    Lets tests build VAR tables for a model that has none; the texts are not a real calibration set.
    """
    import torch

    from var_moe.capture.analyzer import RouterAnalyzer
    from var_moe.loading import load_model

    model, tok = load_model(str(model_dir))
    texts = [p.read_text() for p in sorted((REPO_ROOT / "var_moe").rglob("*.py"))][:num_docs]
    analyzer = RouterAnalyzer(model, tokenizer=tok)
    for i in range(0, len(texts), 8):
        enc = tok(texts[i:i + 8], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        with torch.no_grad():
            analyzer.analyze_batch(enc["input_ids"], enc["attention_mask"])
    return analyzer.write_parquet(out_path, {"model": str(model_dir), "dataset": "var_moe-sources",
                                             "split": "calibration"})


def permissive_var_config() -> dict:
    """VARConfig fields under which a random tiny model (high routing entropy) still gets table entries."""
    from dataclasses import fields

    from var_moe.var import VARConfig

    names = {f.name for f in fields(VARConfig)}
    cfg = {"frequency_threshold": 1, "target_agreement": 0.05, "shadow_rate": 0.5}
    if "entropy_relative" in names:  # threshold as a share of ln E
        cfg.update(entropy_relative=True, entropy_threshold=1.0)
    else:
        cfg["entropy_threshold"] = 5.0  # nats, above ln E for any E here
    return cfg


def var_args(model_dir: Path, tmp: Path) -> list[str]:
    """VAR for the test server: the model's own tables if it has them (shadow checks on), else tables
    from a quick capture with permissive thresholds (a random tiny model routes with high entropy)."""
    tables = model_dir / "var" / "var_tables.safetensors"
    cfg_path = tmp / "var.json"
    if tables.exists():
        from var_moe.var import VARTables

        cfg = dict(VARTables.load(tables).metadata.get("config") or {})
        cfg.pop("routing_stats_path", None)
        cfg_path.write_text(json.dumps({**cfg, "shadow_rate": 0.5}))
        return ["--var-config", str(cfg_path)]
    stats = calibration_stats(model_dir, tmp / "calib.parquet")
    cfg_path.write_text(json.dumps(permissive_var_config()))
    return ["--routing-stats", str(stats), "--var-config", str(cfg_path)]
