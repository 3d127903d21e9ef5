"""The one place where the server meets the VAR router (var_moe.var) and the capture (var_moe.capture).

`RoutingRuntime.load(settings)` loads the model and, when the VAR package and a tables file are
available, wraps it with `VARModelWrapper`. Everything the engine needs goes through this class:

- `set_mode(var)` between batches (never inside one),
- `begin_batch()` / `end_batch(valid_tokens_B)`: per-row tier counts of the batch (for the
  request's response) and the routing / verification counters added by the batch (for metrics),
- `status()`: VAR config, table sizes, availability,
- `capture_start()` / `capture_stop()` / `capture_parquet(path)`: Phase 1 statistics from live traffic.

Without VAR (package missing, no tables, or a wrapper error), VAR mode is reported as unavailable
with the reason; it is never simulated. In baseline mode every routing decision is made by the
learned router, so the tier counts are the valid tokens per MoE layer under tier `learned`.
Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

from var_moe.adapters import get_adapter
from var_moe.errors import InvalidInputError
from var_moe.loading import LoadSpec, load_model

log = logging.getLogger("varmoe.server")

TIERS = ("fast", "cached", "learned")


def _optional_import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _call_with_supported(fn, **kwargs):
    """Call fn with the keyword arguments its signature accepts (the library's API is young)."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


class RoutingRuntime:
    def __init__(self, model: Any, tokenizer: Any, model_name: str, wrapper: Any = None, reason: str = ""):
        self.base_model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.wrapper = wrapper
        self.unavailable_reason = "" if wrapper is not None else (reason or "VAR is not available")
        self.adapter = get_adapter(model)
        self.layers = [m.layer for m in self.adapter.moe_layers(model)]
        self.var_active = False
        self.analyzer = None
        self.capturing = False
        self.capture_tokens = 0
        self._tier_before: dict = {}
        self._verif_before: dict = {}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, settings) -> "RoutingRuntime":
        spec = LoadSpec(path=settings.model, dtype=settings.dtype, device=settings.device,
                        quantization=settings.quantization, trust_remote_code=settings.trust_remote_code)
        model, tokenizer = load_model(spec)
        wrapper, reason = None, ""
        var_pkg = _optional_import("var_moe.var")
        if var_pkg is None or not hasattr(var_pkg, "VARModelWrapper"):
            reason = "the VAR package (var_moe.var) is not installed in this build"
        elif settings.var_tables_path is None and settings.routing_stats_path is None:
            reason = (f"no VAR tables: pass --var-tables or --routing-stats, or put var_tables.safetensors "
                      f"or routing_stats_calibration.parquet in {settings.model}/var/")
        else:
            try:
                wrapper = cls._build_wrapper(var_pkg, model, settings)
            except (ValueError, OSError, KeyError) as exc:  # wrong model / bad file / bad config
                if settings.var_tables or settings.routing_stats or settings.var_config:
                    raise InvalidInputError(f"VAR could not be set up: {exc}") from exc  # the operator asked for it
                reason = f"VAR could not be set up from the files next to the model: {exc}"
                log.warning(reason)
        rt = cls(model, tokenizer, settings.model, wrapper, reason)
        rt.set_mode(bool(wrapper is not None and settings.var_on_start))
        return rt

    @staticmethod
    def _build_wrapper(var_pkg, model, settings):
        """VARModelWrapper from the tables file, or tables built from the calibration statistics."""
        tables_path, stats_path = settings.var_tables_path, settings.routing_stats_path
        tables = var_pkg.VARTables.load(tables_path, model=model) if tables_path else None
        if settings.var_config:
            p = Path(settings.var_config)
            config = var_pkg.VARConfig.from_json(p) if p.exists() else var_pkg.get_preset(settings.var_config)
        elif tables is not None and tables.metadata.get("config"):
            config = var_pkg.VARConfig.from_dict(tables.metadata["config"])  # the config the tables were built with
        else:
            config = var_pkg.VARConfig()
        if settings.shadow_rate is not None:
            config = config.replace(shadow_rate=settings.shadow_rate)
        if tables is None:
            config = config.replace(routing_stats_path=str(stats_path))
        return var_pkg.VARModelWrapper(model, config.replace(enable_var=False), tables)

    # -- mode ----------------------------------------------------------------------------------
    @property
    def var_available(self) -> bool:
        return self.wrapper is not None

    def set_mode(self, var: bool) -> None:
        """Engine thread only, between batches."""
        if var and not self.var_available:
            raise RuntimeError(self.unavailable_reason)
        if self.wrapper is not None:
            self.wrapper.enable_var() if var else self.wrapper.disable_var()
        self.var_active = var

    @property
    def model(self) -> Any:
        """What the decoder calls: the model itself (the wrapper patches its routers in place)."""
        return self.base_model

    # -- per-batch accounting --------------------------------------------------------------------
    def begin_batch(self) -> None:
        if self.var_active:
            self.wrapper.reset_row_counts()
            self._tier_before = dict(self.wrapper.tier_counts())
            self._verif_before = dict(self.wrapper.verification_counts())

    def end_batch(self, valid_tokens_B: list[int]) -> tuple[list[dict[str, int]], dict, dict]:
        """(per-row tier counts summed over layers, routing decisions added, verification checks added)."""
        if self.capturing:
            self.capture_tokens += sum(valid_tokens_B)
        if not self.var_active:
            # the learned router made every decision: valid tokens x MoE layers
            rows = [{"fast": 0, "cached": 0, "learned": n * len(self.layers)} for n in valid_tokens_B]
            added = {(layer, "learned"): sum(valid_tokens_B) for layer in self.layers}
            return rows, added, {}
        rows = self._rows_from_wrapper(len(valid_tokens_B))
        tiers = _delta(self.wrapper.tier_counts(), self._tier_before)
        verif = _delta(self.wrapper.verification_counts(), self._verif_before)
        return rows, tiers, verif

    def _rows_from_wrapper(self, b: int) -> list[dict[str, int]]:
        counts_B3 = self.wrapper.row_tier_counts()  # fast / cached / learned, valid tokens, all layers
        rows = [dict(zip(TIERS, map(int, r))) for r in counts_B3.tolist()]
        return (rows + [dict.fromkeys(TIERS, 0) for _ in range(b)])[:b]

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"available": self.var_available, "layers": self.layers}
        if not self.var_available:
            out["unavailable_reason"] = self.unavailable_reason
            return out
        out["config"] = self.wrapper.config.to_dict()
        out["table_sizes"] = {str(k): int(v) for k, v in self.wrapper.table_sizes().items()}
        # entries taken out by shadow verification since start (table_sizes already excludes them)
        out["demoted"] = {l: s["demoted"] for l, s in self.wrapper.get_performance_stats()["layers"].items()}
        out["tables_source"] = self.wrapper.tables.metadata.get("source")
        return out

    # -- capture -------------------------------------------------------------------------------
    def capture_available(self) -> tuple[bool, str]:
        mod = _optional_import("var_moe.capture.analyzer")
        if mod is None or not hasattr(mod, "RouterAnalyzer"):
            return False, "the capture module (var_moe.capture.analyzer) is not installed in this build"
        return True, ""

    def capture_start(self) -> None:
        ok, reason = self.capture_available()
        if not ok:
            raise RuntimeError(reason)
        if self.capturing:
            return
        mod = importlib.import_module("var_moe.capture.analyzer")
        self.analyzer = _call_with_supported(mod.RouterAnalyzer, model=self.base_model, tokenizer=self.tokenizer)
        self.analyzer.attach()
        self.capturing = True
        self.capture_tokens = 0

    def capture_stop(self) -> None:
        if self.analyzer is not None and self.capturing:
            self.analyzer.detach()
        self.capturing = False

    def capture_parquet(self, path: Path) -> None:
        if self.analyzer is None:
            raise LookupError("no capture has been started on this server")
        meta = {"model": self.model_name, "dataset": "live-traffic", "split": "server",
                "source": "varmoe serve", "var_enabled": self.var_active}
        self.analyzer.write_parquet(path, meta)


def _delta(now: dict, before: dict) -> dict:
    return {k: int(v) - int(before.get(k, 0)) for k, v in dict(now).items() if int(v) - int(before.get(k, 0))}
