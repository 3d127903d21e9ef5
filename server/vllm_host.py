"""`VllmHost`: `varmoe serve --engine vllm`'s model side, a vLLM engine with VAR as a `StepHost`.

`VllmHost.load(settings)` builds a vLLM `LLMEngine` (`engine_args`: what the operator set) with the
Var* model classes (var_moe.vllm), then loads the tables file on every worker through
`collective_rpc` (refused for other weights). Without a tables file, or for an architecture VAR does
not support on vLLM, it serves the plain vLLM model and reports VAR unavailable with the reason.

Requests carry their own mode (vllm_engine.py), so `apply_mode` only sets the workers' default;
`counts()` reads the device counters (VAR rows only; verification is the free audit of every table
row: no sampling, no demotion on this engine). A fast decision depends on the token and its previous
token only, so `request_tiers` makes the workers' decision on a host copy of the served tables,
without a device read. Capture runs on the builtin engine only (`can_capture` False).
Test: `pytest tests/vllm_engine/test_vllm_server.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil

from var_moe.errors import InvalidInputError
from var_moe.identity import checkpoint_fingerprint
from var_moe.var import served_dtype
from var_moe.var.served import ServedTables, tier_counts
from var_moe.var.tables import VARTables
from var_moe.vllm import engine_kwargs, model_architecture
from var_moe.vllm.agreement import table_agreement, worker_counts
from var_moe.vllm.expert_load import reading_from
from var_moe.vllm.models import SUPPORTED

from .var_runtime import Counts, ModeSwitch


def engine_args(settings) -> dict[str, Any]:
    """vLLM engine keyword arguments from the server settings (only what the operator set)."""
    kw: dict[str, Any] = {"dtype": settings.dtype, "seed": 0, "tensor_parallel_size": settings.tensor_parallel_size,
                          "data_parallel_size": settings.data_parallel_size,
                          "enforce_eager": settings.enforce_eager, "max_num_seqs": settings.max_batch_size,
                          # vLLM's statistics cost work every step (scheduler stats in the engine core,
                          # per-request timings here); the server counts what it exports itself
                          "disable_log_stats": not settings.vllm_log_stats}
    optional = {"gpu_memory_utilization": settings.gpu_memory_utilization, "max_model_len": settings.max_model_len,
                "kv_cache_memory_bytes": kv_cache_bytes(settings, on_cpu=vllm_on_cpu())}
    kw |= {k: v for k, v in optional.items() if v is not None}  # None: vLLM's default
    if settings.vllm_quantization:
        kw["quantization"] = settings.vllm_quantization
    if settings.trust_remote_code:
        kw["trust_remote_code"] = True
    return kw


GiB = 1 << 30
MIN_KV_CACHE_BYTES = GiB // 4


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM is its CPU build (False where vLLM is not installed)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def kv_cache_bytes(settings, on_cpu: bool) -> int | None:
    """The KV cache vLLM reserves: --kv-cache-gib, else on the CPU build what --max-batch-size
    sequences of the model's whole context need (float32 upper bound, +25%, at least 0.25 GiB);
    vLLM's own CPU default reserves nearly all of the machine's memory (and refuses to start when
    other processes hold some of it). None on GPUs: vLLM sizes it from --gpu-memory-utilization.
    A default that would take over half of the free memory is refused, naming the settings."""
    if settings.kv_cache_gib is not None:
        return int(settings.kv_cache_gib * GiB)
    if not on_cpu:
        return None
    cfg_path = Path(settings.model) / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg = cfg.get("text_config", cfg)
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size") or 0) // heads)
    max_len = int(settings.max_model_len or cfg.get("max_position_embeddings") or 0)
    need = 2 * int(cfg.get("num_hidden_layers") or 0) * kv_heads * head_dim * 4 * max_len * settings.max_batch_size
    size = max(MIN_KV_CACHE_BYTES, int(need * 1.25))
    free = int(psutil.virtual_memory().available)
    if size > free // 2:
        raise InvalidInputError(
            f"the KV cache for --max-batch-size {settings.max_batch_size} sequences of {max_len} tokens needs "
            f"{size / GiB:.2f} GiB, over half of the {free / GiB:.2f} GiB free: set --kv-cache-gib "
            "(VARMOE_KV_CACHE_GIB), or lower --max-model-len or --max-batch-size")
    return size


def pair_capacity(settings, tables) -> int:
    """Room for (previous, token) entries in the engine: the operator's --vllm-pair-capacity, else
    exactly what the startup tables hold. With a capacity above 0 every VAR step looks pairs
    up (on the host, and a gather per MoE layer on the device), so tables without pair entries
    build no pair tier and cost nothing for it."""
    if settings.vllm_pair_capacity is not None:
        return int(settings.vllm_pair_capacity)
    return sum(tables.pair_sizes().values())


def dtype_check(engine: Any, settings, tables) -> Any:
    """The start-up check of tables certified in another dtype (var_moe.var.served_dtype), measured by
    the workers' audit counters."""
    def measure(batches):
        return table_agreement(engine, [ids[mask.bool()].tolist() for b in batches for ids, mask in zip(b.ids, b.mask)])

    return served_dtype.check_tables(engine.vllm_config.model_config.dtype, tables, settings.model,
                                     engine.get_tokenizer(), measure, settings.var_dtype_check == "refuse")


class VllmHost(ModeSwitch):
    """A `StepHost` (server/host.py)."""

    can_capture = capturing = capture_started = False
    capture_tokens = 0

    def __init__(self, engine: Any, model_name: str, tables_info: dict | None, served: ServedTables | None,
                 layers: list[int], reason: str = ""):
        self.llm = engine
        self.model_name = model_name
        self.tokenizer = engine.get_tokenizer()
        cfg = engine.vllm_config.model_config
        hf = cfg.hf_config
        # the routes read only model.config (vocabulary, context length)
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=int(hf.vocab_size),
                                                            max_position_embeddings=int(cfg.max_model_len)))
        self.layers = layers
        self.tables_info = tables_info
        self.served = served  # host copy of the served tables (slot: index in layers), for per-request counts
        self.unavailable_reason = "" if tables_info is not None else (reason or "VAR is not available")
        self.num_experts = int(getattr(hf, "num_local_experts", None) or getattr(hf, "num_experts", 0) or 0)
        self.top_k = int(getattr(hf, "num_experts_per_tok", 0) or 0)

    @classmethod
    def load(cls, settings) -> "VllmHost":
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as exc:
            raise InvalidInputError(f"--engine vllm needs vLLM in this environment (make setup-vllm): {exc}") from None

        tables_path = settings.var_tables_path
        reason = ""
        arch = model_architecture(settings.model) if os.path.isdir(settings.model) else None
        if tables_path is None:
            reason = (f"no VAR tables: pass --var-tables or put var_tables.safetensors in {settings.model}/var/ "
                      "(the vLLM engine reads tables files, not statistics)")
        elif arch not in SUPPORTED:
            reason = f"VAR on vLLM supports {sorted(SUPPORTED)}; this model is {arch!r}"
        kw = engine_args(settings)
        if reason:
            kw["model"] = settings.model
        else:
            tables = VARTables.load(tables_path)  # identity checked by the workers, against the gates vLLM loads
            # other weights are refused before vLLM loads anything, by the stored checkpoint's routers (only
            # the fingerprint is compared: the other fields are the tables' own)
            stored = checkpoint_fingerprint(settings.model)
            if stored is not None:
                ident = {k: tables.metadata.get(k) for k in ("model_type", "vocab_size", "num_experts", "top_k")}
                tables.check_identity({**ident, "router_fingerprint": stored}, True, str(tables_path),
                                      f"the checkpoint in {settings.model}")
            counting = settings.expert_load_metrics or settings.expert_load_per_expert  # off: none in the graph
            kw = engine_kwargs(settings.model, pair_capacity=pair_capacity(settings, tables), expert_load=counting,
                               **kw)
        try:
            engine = LLMEngine.from_engine_args(EngineArgs(**kw))
        except (RuntimeError, ValueError, MemoryError) as exc:
            kv = kw.get("kv_cache_memory_bytes")
            raise InvalidInputError(
                f"vLLM's engine did not start ({exc}); it was given a KV cache of "
                f"{'vLLM default size' if kv is None else f'{kv / GiB:.2f} GiB'}: if memory ran short, set "
                "--kv-cache-gib (VARMOE_KV_CACHE_GIB) lower, or --max-model-len / --max-batch-size") from None
        if settings.front_off_compute_cores and vllm_on_cpu():
            from .cpu_affinity import front_off_compute_cores

            front_off_compute_cores()
        if reason:
            hf = engine.vllm_config.model_config.hf_config
            return cls(engine, settings.model, None, None, list(range(int(hf.num_hidden_layers))), reason)
        try:
            replies = engine.collective_rpc("varmoe_load_tables", args=(str(tables_path),))
        except Exception as exc:  # a worker process hands the error back wrapped
            raise InvalidInputError(f"VAR could not be set up on vLLM: {exc}") from None
        refused = [r["error"] for r in replies if "error" in r]
        if refused:  # every rank checks the same tables against the same gates
            raise InvalidInputError(refused[0])
        layers = sorted(worker_counts(engine))
        info = replies[0]
        info["dtype_check"] = dtype_check(engine, settings, tables).to_json()
        return cls(engine, settings.model, info, ServedTables.from_tables(tables, layers), layers)

    # -- RoutingBackend --------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.tables_info is not None

    def _switch(self, var: bool) -> None:  # ModeSwitch.apply_mode
        """The workers' mode for requests that do not name one (the server's requests always do)."""
        self.llm.collective_rpc("varmoe_set_enabled", args=(var,))

    def counts(self) -> tuple[Counts, Counts]:
        if not self.available:
            return {}, {}
        tiers: Counts = {}
        verification: Counts = {}
        for l, c in worker_counts(self.llm).items():
            tiers.update({(l, "fast"): c[0], (l, "learned"): c[1]})
            verification.update({(l, "agree"): c[2], (l, "disagree"): c[3]})
        return tiers, verification

    def info(self) -> dict[str, Any]:
        if not self.available:
            return {}
        info = self.tables_info
        return {"config": info.get("config") or {}, "table_sizes": {str(k): int(v) for k, v in info["sizes"].items()},
                "demoted": {str(l): 0 for l in self.layers}, "tables_source": info["source"],
                "engine": "vllm", "router_fingerprint": info.get("fingerprint"),
                "pair_entries": int(info.get("pair_entries", 0)), "dtype_check": info.get("dtype_check"),
                "pair_sizes": {str(k): int(v) for k, v in (info.get("pair_sizes") or {}).items()},
                "tiers": "fast (verified token table, and (previous, token) entries where the tables have them) "
                         "and learned; no context cache on this engine; every table decision is checked against "
                         "the learned router (verification)"}

    # -- per-request tier counts -----------------------------------------------------------------
    def request_tiers(self, var: bool, forwarded_ids: list[int], prev_id: int = -1) -> dict[str, int]:
        """Routing decisions of one request summed over MoE layers (valid tokens x layers), from the
        same decision the workers make (`served.tier_counts`). `prev_id`: the token before
        forwarded_ids[0] (-1: none, the sequence starts there)."""
        if not var or self.served is None:
            return {"fast": 0, "learned": len(forwarded_ids) * len(self.layers)}
        return tier_counts(self.served, forwarded_ids, prev_id)

    # -- expert load and routed experts (var_moe/vllm/expert_load.py) --------------------------------
    expert_load_on_engine = True  # reading the counters is a call to the workers: on the engine thread
    expert_load_switchable = False  # the counting is compiled into the model's graph at start-up

    @property
    def routed_available(self) -> bool:
        return self.available  # the buffers come with the Var* model classes

    def start_expert_load(self) -> tuple[int, tuple[str, ...]] | None:
        """(experts, tiers) of the workers' counters (counting runs in the compiled model already);
        None for a plain vLLM model (no VAR classes, so no counters)."""
        if not self.available:
            return None
        shape = self.llm.collective_rpc("varmoe_load_shape")[0]
        if not shape.get("counting", True):
            return None
        return int(shape["experts"]), tuple(shape["tiers"])

    def expert_load_reading(self):
        """The cumulative counters (engine thread). Tensor-parallel ranks route the same rows with
        the same gates, so the first worker's counters are the model's."""
        return reading_from(self.llm.collective_rpc("varmoe_load_read")[0])

    def set_expert_load(self, on: bool) -> None:  # expert_load_switchable is False: the route answers 409
        raise NotImplementedError("the vLLM engine's counting is compiled into its graph")

    def take_routed(self, keys: list[str], finished: list[str]) -> dict[str, list]:
        """Rows so far of requests that asked for their routed experts (engine thread)."""
        return self.llm.collective_rpc("varmoe_take_routed", args=(keys, finished))[0]

    def capture_start(self, *args: Any) -> None:  # can_capture is False: the routes answer 409 first
        raise NotImplementedError("capture runs on the builtin engine")

    capture_stop = capture_parquet = capture_start
