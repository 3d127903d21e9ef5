"""`VarWorkerExtension`: the worker-side VAR controls, called from the engine with `collective_rpc`.

vLLM mixes this class into every worker (`worker_extension_cls`), so the same call reaches the
in-process worker, spawned worker processes, and each tensor/data-parallel rank:

    llm.collective_rpc("varmoe_load_tables", args=(path,))   # {"error": ...} per rank when refused
    llm.collective_rpc("varmoe_set_enabled", args=(True,))   # the mode of requests that name none
    llm.collective_rpc("varmoe_counts")                      # {layer: [fast, learned, agree, disagree]}
    llm.collective_rpc("varmoe_load_read")                   # expert-load counters (expert_load.py)
    llm.collective_rpc("varmoe_take_routed", args=(keys, finished))  # routed experts of asking requests

The model must have been built as a Var* architecture (models.py); these methods only write its
buffers or read them. The first call also hooks the model runner (rows.py: per-request modes; the
default mode set here applies from the next step). Counters count VAR-mode rows only; a pair-entry
row counts as fast.
Test: `pytest tests/vllm_engine/test_vllm_exact.py`.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInputError
from .rows import install_rows
from .tables import load_tables, loaded_identity


class VarWorkerExtension:
    def _varmoe_state(self):
        model = self.model_runner.model
        model = getattr(model, "unwrap", lambda: model)()  # CUDA-graph wrappers hold the model inside
        state = getattr(model, "_varmoe_state", None)
        if state is None:
            raise RuntimeError("this vLLM model was not built with VAR: start the engine with "
                               "var_moe.vllm.engine_kwargs(...) (a Var* architecture)")
        install_rows(self.model_runner, state)  # idempotent
        return state

    def varmoe_load_tables(self, path: str, check_fingerprint: bool = True) -> dict[str, Any]:
        """{layer sizes, source, config, fingerprint, pair sizes, pair entries, pair capacity}, or
        {"error": why} for tables refused for this model or over the pair capacity
        (nothing written). Returned, not raised: with several workers vLLM hands the caller the first
        rank's exception and leaves the other ranks' replies unread, so the next call would read them."""
        try:
            return load_tables(self._varmoe_state(), path, check_fingerprint)
        except InvalidInputError as exc:
            return {"error": str(exc)}

    def varmoe_set_enabled(self, enabled: bool) -> bool:
        self._varmoe_state().default_on = bool(enabled)
        return bool(enabled)

    def varmoe_counts(self) -> dict[int, list[int]]:
        """Cumulative counters per MoE layer (one device-to-host copy for all layers)."""
        state = self._varmoe_state()
        rows = state.counts_SC.cpu().tolist()
        return {l: rows[lv.slot] for l, lv in sorted(state.layers.items())}

    def varmoe_reset_counts(self) -> None:
        self._varmoe_state().counts_SC.zero_()

    def varmoe_record(self, on: bool) -> None:
        """Keep every forward's per-row decisions (token, table row?, experts used, learned experts).
        Only an eager engine (`enforce_eager=True`) records: compiled graphs skip this Python branch."""
        for lv in self._varmoe_state().layers.values():
            lv.record = [] if on else None

    def varmoe_records(self) -> dict[int, list]:
        return {l: list(lv.record or []) for l, lv in sorted(self._varmoe_state().layers.items())}

    def varmoe_load_shape(self) -> dict[str, Any]:
        """{experts, tiers, counting} of the expert-load counters (expert_load.py)."""
        load = self._varmoe_state().load
        return {"experts": load.num_experts, "tiers": list(load.counter.tiers), "counting": load.counting}

    def varmoe_load_read(self) -> dict[str, Any]:
        """The cumulative expert-load counters (one device-to-host copy per buffer)."""
        return self._varmoe_state().load.read()

    def varmoe_take_routed(self, keys: list[str], finished: list[str]) -> dict[str, list]:
        """Routed experts so far of requests that asked for them ([positions][layers][k])."""
        return self._varmoe_state().load.take_routed(list(keys), list(finished))

    def varmoe_info(self) -> dict[str, Any]:
        state = self._varmoe_state()
        sizes = state.member_SV.sum(1).tolist()
        table_sizes = {l: int(sizes[lv.slot]) for l, lv in sorted(state.layers.items())}
        return {**loaded_identity(state), "table_sizes": table_sizes,
                "pair_capacity": state.pair_capacity, "pair_entries": state.pair_entries, "enabled": state.default_on}
