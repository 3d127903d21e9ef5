"""Server settings: one pydantic-settings class read from `VARMOE_*` environment variables and flags.

Precedence: command-line flags (`varmoe serve --port 9000`) > environment (`VARMOE_PORT=9000`) >
defaults. Every field is declared once, here: `varmoe serve`'s flags and `--help` are generated from
these fields (server/cli.py), each description being its help. Defaults serve the reference model
(`models/reference-moe`) on 127.0.0.1:8000 with its VAR tables and calibration routing statistics
when those files are present in `<model>/var/`. Invalid values fail at start-up with a message
naming the setting. Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from var_moe.loading import REFERENCE_MODEL_DIR

VAR_TABLES_FILE = "var_tables.safetensors"
ROUTING_STATS_FILE = "routing_stats_calibration.parquet"
# VAR artifacts live in a sub-folder, never beside the weights: engines such as vLLM load every
# top-level *.safetensors of a model folder and refuse one holding VAR tables.
VAR_DIR = "var"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VARMOE_", extra="forbid", frozen=True)

    # -- model -------------------------------------------------------------------------------
    model: str = Field(str(REFERENCE_MODEL_DIR), description="local folder or hub id (default: the reference model)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto | float32 | bfloat16 | float16 (auto: the checkpoint's; vLLM: its own choice)")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="cpu | cuda | auto")
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="4bit | 8bit (bitsandbytes, CUDA only)")
    trust_remote_code: bool = Field(False, description="run the model repo's own Python")
    served_model_name: str | None = Field(
        None, max_length=256, description="the model's name in the API (default: the folder's name or the hub id)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads of the engine thread")
    # -- engine (the builtin engine is the reference for capture and audit) ------------------
    engine: Literal["builtin", "vllm"] = Field(
        "builtin", description="builtin (default; capture and audit) | vllm (needs the vLLM environment)")
    # passed through to vLLM (--engine vllm only)
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per replica (tensor parallel)")
    data_parallel_size: int = Field(1, ge=1, le=1, description="vLLM: 1 only (data parallel: replicas behind a "
                                                               "load balancer, docs/SERVER.md)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vLLM: share of GPU memory")
    max_model_len: int | None = Field(None, ge=16, description="vLLM: context length (default: the model's)")
    vllm_quantization: str | None = Field(None, description="vLLM: quantization method (awq, gptq, fp8, ...)")
    enforce_eager: bool = Field(False, description="vLLM: no torch.compile / CUDA graphs")
    vllm_pair_capacity: int | None = Field(
        None, ge=0, description="vLLM: (previous, token) table entries the engine can hold, all layers together "
                                "(default: as many as the startup tables file holds, 0 for a file without "
                                "them; a tables file with more is refused)")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="vLLM: GiB of memory for the KV cache (default on the CPU build: what --max-batch-size "
                                "sequences of the model's full context need, at least 0.25 GiB; on GPUs: vLLM's "
                                "--gpu-memory-utilization share)")
    var_dtype_check: Literal["refuse", "warn"] = Field(
        "refuse", description="served in another dtype than the VAR tables were certified in: measure their agreement "
                              "at start-up and refuse (or only warn) when a layer falls under the tables' target")
    front_off_compute_cores: bool = Field(
        True, description="vLLM CPU build: run this server's own threads (HTTP, engine loop) on the allowed cores "
                          "that vLLM's compute threads are not bound to, when there are such cores")
    vllm_log_stats: bool = Field(
        False, description="vLLM: its own per-step statistics and periodic log line (the server's /metrics "
                           "does not need them; off, as `--disable-log-stats` on vLLM's server)")
    # -- VAR ---------------------------------------------------------------------------------
    var_tables: Path | None = Field(None, description=f"VAR tables (.safetensors); default <model>/{VAR_DIR}/{VAR_TABLES_FILE} if present")
    routing_stats: Path | None = Field(None, description=f"Phase 1 statistics; default <model>/{VAR_DIR}/{ROUTING_STATS_FILE} if present")
    var_config: str | None = Field(None, description="VARConfig JSON file or preset name")
    var_on_start: bool = Field(True, description="start in VAR mode when VAR is available")
    allow_var_pin_when_off: bool = Field(
        False, description="accept a per-request `var: true` while the admin has VAR off (default: 409)")
    shadow_rate: float | None = Field(
        None, ge=0.0, le=1.0,
        description="share of fast/cached decisions re-checked by the learned router (overrides the VAR config)")
    # -- expert load (/metrics) and routed experts (API) ---------------------------------------
    expert_load_metrics: bool = Field(
        True, description="expert-load gauges in /metrics, a few series per MoE layer (imbalance, hottest "
                          "expert's share, experts without tokens, routing entropy), counted on the device")
    expert_load_per_expert: bool = Field(
        False, description="also varmoe_expert_tokens_total{layer,expert}: MoE layers x experts series")
    expert_load_window_s: float = Field(60.0, gt=0, le=86_400, description="sliding window of the expert-load gauges")
    max_response_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="largest response a request may ask for (return_routed_experts over it: 413)")
    # -- HTTP --------------------------------------------------------------------------------
    # loopback unless the operator opens it on purpose
    host: str = Field("127.0.0.1", description="bind address (default 127.0.0.1)")
    port: int = Field(8000, ge=0, le=65535, description="port (default 8000; 0 = any free port)")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the admin endpoints (no flag: keep it out of the process list). "
                          "Unset: POST /var/toggle and /admin/capture/* refuse with 403.")
    # -- batching and limits -----------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=256, description="rows per model batch (vLLM: max_num_seqs)")
    max_wait_ms: float = Field(50.0, ge=0, le=10_000, description="longest wait (ms) for the clients of the batch that just ended")
    max_queue: int = Field(64, ge=1, description="waiting requests beyond this get 429")
    request_timeout_s: float = Field(120.0, gt=0, description="per-request time limit")
    max_prompt_tokens: int = Field(1024, ge=1, description="longest accepted prompt (capped by the model's context length)")
    max_new_tokens_limit: int = Field(512, ge=1, description="largest accepted max_new_tokens / max_tokens")
    max_request_prompts: int = Field(
        16, ge=1, le=64, description="prompts / texts per request (capped at max_queue; keep it well below)")
    max_request_tokens: int = Field(
        16_384, ge=1, description="work budget of one request: prompt tokens + max new tokens, summed over its prompts")
    shutdown_grace_s: float = Field(30.0, ge=0, description="total shutdown time: open requests, then the engine drain")
    # -- HTTP hardening ------------------------------------------------------------------------
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="larger request bodies get 413 before parsing")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this time (else 408)")
    max_connections: int = Field(256, ge=1, description="open connections + requests before uvicorn answers 503")
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this time")

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, v):
        return None if v in ("", None) else v

    @field_validator("data_parallel_size", mode="before")
    @classmethod
    def _one_data_parallel_rank(cls, v):
        # The server steps vLLM's synchronous LLMEngine, whose client sends every request and every
        # collective_rpc to data-parallel rank 0 only (measured with 2 ranks: one reply, and
        # generation hung waiting for the idle rank). Refused rather than served half-configured.
        if v is not None and int(v) > 1:
            raise ValueError(
                "data parallelism is not supported by `varmoe serve --engine vllm`: vLLM's synchronous engine "
                "reaches data-parallel rank 0 only (its other ranks would get no tables and no requests). "
                "Scale out with one server per GPU group behind a load balancer, and with "
                "--tensor-parallel-size inside each (docs/SERVER.md, Scaling out)")
        return v

    @field_validator("var_tables", "routing_stats")
    @classmethod
    def _file_exists(cls, p: Path | None):
        if p is not None and not Path(p).is_file():
            raise ValueError(f"file {p} does not exist")
        return p

    def default_file(self, explicit: Path | None, filename: str) -> Path | None:
        """The explicit path, else `<model>/var/<filename>` when the model is a local folder holding it."""
        if explicit is not None:
            return Path(explicit)
        candidate = Path(self.model) / VAR_DIR / filename
        return candidate if candidate.exists() else None

    @property
    def var_tables_path(self) -> Path | None:
        return self.default_file(self.var_tables, VAR_TABLES_FILE)

    @property
    def routing_stats_path(self) -> Path | None:
        return self.default_file(self.routing_stats, ROUTING_STATS_FILE)

    @property
    def model_label(self) -> str:
        """The name the API reports: never a local path (it would tell clients the server's file layout)."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if Path(self.model).exists() else self.model

    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None
