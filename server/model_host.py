"""`ModelHost`: the builtin engine's model, tokenizer, VAR router and live capture (a `BatchHost`).

`ModelHost.load(settings)` loads the model and, when a tables file or calibration statistics are
available (`--var-tables`, `--routing-stats`, or `<model>/var/`), wraps it with `VARModelWrapper`.
Without VAR (no tables, or files that do not fit the model and were not asked for explicitly) VAR
is reported as unavailable with the reason; it is never simulated. Per-request tier counts come
from the wrapper's per-row counts of the batch; expert load and routed experts from a `RoutingTap`
on the routers the blocks call; capture attaches a `RouterAnalyzer` on the engine thread between
batches. Test: `pytest tests/test_server_engine.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from var_moe.adapters import get_adapter
from var_moe.capture.analyzer import RouterAnalyzer
from var_moe.errors import InvalidInputError
from var_moe.loading import LoadSpec, load_model
from var_moe.routing_tap import RoutingTap
from var_moe.var import VARConfig, VARModelWrapper, VARTables, get_preset
from var_moe.var.served_dtype import DtypeCheckFailed, builtin_agreement, check_tables

from .var_runtime import TIERS, Counts, ModeSwitch

log = logging.getLogger("varmoe.server")


class ModelHost(ModeSwitch):
    """A `BatchHost` (server/host.py)."""

    routed_available = True  # the routing tap answers return_routed_experts
    expert_load_on_engine = False  # the counters are device tensors any thread may copy
    expert_load_switchable = True  # the counting is a tap's hooks, put on and taken off between forwards
    can_capture = True

    def __init__(self, model: Any, tokenizer: Any, model_name: str, wrapper: VARModelWrapper | None = None,
                 reason: str = "", dtype_check: Any = None):
        self.model = model
        self.dtype_check = dtype_check
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.wrapper = wrapper
        self.unavailable_reason = "" if wrapper is not None else (reason or "VAR is not available")
        adapter = get_adapter(model)
        self.layers = [m.layer for m in adapter.moe_layers(model)]
        self.num_experts, self.top_k = adapter.num_experts, adapter.top_k
        # hooks on the routers the blocks call: VAR's when installed, counted per tier (a table's rows are fast)
        self.tap = RoutingTap.for_wrapper(model, wrapper, count=False, adapter=adapter)
        self.analyzer: RouterAnalyzer | None = None
        self.capturing = False
        self.capture_tokens = 0

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, settings) -> "ModelHost":
        spec = LoadSpec(path=settings.model, dtype=settings.dtype, device=settings.device,
                        quantization=settings.quantization, trust_remote_code=settings.trust_remote_code)
        model, tokenizer = load_model(spec)
        wrapper, reason, check = None, "", None
        if settings.var_tables_path is None and settings.routing_stats_path is None:
            reason = (f"no VAR tables: pass --var-tables or --routing-stats, or put var_tables.safetensors "
                      f"or routing_stats_calibration.parquet in {settings.model}/var/")
        else:
            try:
                wrapper, check = _build_wrapper(model, tokenizer, settings)
            except DtypeCheckFailed:
                raise  # measured and under target: never served silently without VAR instead
            except (ValueError, OSError, KeyError) as exc:  # wrong model / bad file / bad config
                if settings.var_tables or settings.routing_stats or settings.var_config:
                    raise InvalidInputError(f"VAR could not be set up: {exc}") from exc  # the operator asked for it
                reason = f"VAR could not be set up from the files in the model's var/ folder: {exc}"
                log.warning(reason)
        return cls(model, tokenizer, settings.model, wrapper, reason, check)

    # -- RoutingBackend --------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.wrapper is not None

    def _switch(self, var: bool) -> None:  # ModeSwitch.apply_mode
        self.wrapper.enable_var() if var else self.wrapper.disable_var()

    def counts(self) -> tuple[Counts, Counts]:
        if self.wrapper is None:
            return {}, {}
        return dict(self.wrapper.tier_counts()), dict(self.wrapper.verification_counts())

    def info(self) -> dict[str, Any]:
        w = self.wrapper
        if w is None:
            return {}
        return {
            "config": w.config.to_dict(),
            "table_sizes": {str(k): int(v) for k, v in w.table_sizes().items()},
            # entries taken out by shadow verification since start (table_sizes already excludes them)
            "demoted": {l: s["demoted"] for l, s in w.get_performance_stats()["layers"].items()},
            "tables_source": w.tables.metadata.get("source"),
            "tables_uncertified": w.tables.metadata.get("uncertified"),  # None: certified on held-out documents
            "dtype_check": self.dtype_check.to_json() if self.dtype_check is not None else None,
        }

    # -- per-request tier counts -----------------------------------------------------------------
    def begin_batch(self) -> None:
        if self._var_applied:
            self.wrapper.reset_row_counts()

    def row_tier_counts(self, valid_tokens_B: list[int]) -> list[dict[str, int]]:
        """Routing decisions of each row of the batch just run, summed over MoE layers."""
        if self.capturing:
            self.capture_tokens += sum(valid_tokens_B)
        b = len(valid_tokens_B)
        if not self._var_applied:  # the learned router made every decision
            return [{"fast": 0, "learned": n * len(self.layers)} for n in valid_tokens_B]
        rows = [dict(zip(TIERS, map(int, r))) for r in self.wrapper.row_tier_counts().tolist()]
        return (rows + [dict.fromkeys(TIERS, 0) for _ in range(b)])[:b]

    # -- expert load and routed experts (var_moe/routing_tap.py) --------------------------------
    def start_expert_load(self) -> tuple[int, tuple[str, ...]]:
        self.set_expert_load(True)
        return self.num_experts, self.tap.tiers

    def expert_load_reading(self):
        """The cumulative counters (one device-to-host copy; any thread: counters only grow)."""
        return self.tap.read()

    def set_expert_load(self, on: bool) -> None:
        """Count from the next forward, or count what is filed and stop (engine thread, between
        forwards); the hooks come off unless routed experts are being recorded."""
        self.tap.count = on
        if on:
            self.tap.attach()
        elif self.tap.recording:
            self.tap.flush()
        else:
            self.tap.detach()

    def record_routing(self, on: bool) -> None:
        """Keep the next forwards' experts per row (engine thread, between forwards)."""
        if on and not self.tap.attached:
            self.tap.attach()
        self.tap.recording = on
        self.tap.last_LTK = None

    def last_routing(self):
        """(MoE layers, rows, k) experts of the last forward while recording, else None; and (MoE layers,
        rows) bool, the rows a VAR table served, None when that forward ran without VAR (or with the
        cache tier, whose rows the lookup does not hold)."""
        return self.tap.last_LTK, self.tap.last_fast_LT

    # -- capture -------------------------------------------------------------------------------
    @property
    def capture_started(self) -> bool:
        return self.analyzer is not None

    def capture_start(self) -> None:
        """Start a capture from zero; a second start drops what the running one had gathered."""
        if self.capturing:
            self.analyzer.detach()
        self.analyzer = RouterAnalyzer(self.model, tokenizer=self.tokenizer)
        self.analyzer.attach()
        self.capturing = True
        self.capture_tokens = 0

    def capture_stop(self) -> None:
        if self.capturing:
            self.analyzer.detach()
        self.capturing = False

    def capture_parquet(self, path: Path, var_enabled: bool) -> None:
        if self.analyzer is None:
            raise LookupError("no capture has been started on this server")
        meta = {"model": self.model_name, "dataset": "live-traffic", "split": "server",
                "source": "varmoe serve", "var_enabled": var_enabled}
        self.analyzer.write_parquet(path, meta)


def _build_wrapper(model: Any, tokenizer: Any, settings) -> tuple[VARModelWrapper, Any]:
    """VARModelWrapper from the tables file, or tables built from the calibration statistics, and the
    served-dtype check of a tables file (None for tables built here, in the served dtype): tables
    certified in another dtype are measured on a held-in sample with the model's own routing before
    it is wrapped, and refused under their target unless --var-dtype-check warn."""
    tables_path, stats_path = settings.var_tables_path, settings.routing_stats_path
    tables = VARTables.load(tables_path, model=model) if tables_path else None
    check = None
    if tables is not None:
        check = check_tables(model.dtype, tables, settings.model, tokenizer,
                             lambda batches: builtin_agreement(model, tables, batches),
                             settings.var_dtype_check == "refuse")
    if settings.var_config:
        p = Path(settings.var_config)
        config = VARConfig.from_json(p) if p.exists() else get_preset(settings.var_config)
    elif tables is not None and tables.metadata.get("config"):
        config = VARConfig.from_dict(tables.metadata["config"])  # the config the tables were built with
    else:
        config = VARConfig()
    if settings.shadow_rate is not None:
        config = config.replace(shadow_rate=settings.shadow_rate)
    if tables is None:
        config = config.replace(routing_stats_path=str(stats_path))
    # built disabled: the runtime's mode is applied by the engine before the first batch
    return VARModelWrapper(model, config.replace(enable_var=False), tables), check
