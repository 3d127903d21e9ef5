"""`VARModelWrapper` (alias `VARMixtralWrapper`): puts a `VARRouter` on every (chosen) MoE layer.

    wrapper = VARModelWrapper(model, VARConfig.from_routing_stats("calib.parquet"))
    out = wrapper(input_ids=ids, attention_mask=mask)      # same outputs object as the model
    wrapper.disable_var(); wrapper.enable_var()            # A/B switch at run time
    wrapper.get_performance_stats(); wrapper.restore()     # original router modules back

A `TokenTracker` feeds every router the token ids, padding and previous tokens of each forward (also
across `generate()` steps); the routers share one `stack.TableStack`. With VAR disabled each router
calls the original module with the original input, so routing is exactly the original's;
`suspended()` takes VAR out completely, for timing the unmodified model in the same process.
Test: `pytest tests/test_var_exact.py tests/test_var_router.py`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..adapters import get_adapter
from ..errors import InvalidInputError
from ..token_tracker import TokenTracker
from .config import VARConfig
from .in_sample import tables_for_stats
from .router import VARRouter
from .served import TIERS
from .stack import C, TableStack
from .tables import VARTables


class VARModelWrapper:
    def __init__(self, model: Any, config: VARConfig | None = None, tables: VARTables | None = None,
                 patch_layers: Sequence[int] | None = None):
        self.model = model
        self.config = config or VARConfig()
        self.adapter = get_adapter(model)
        moe = self.adapter.select_moe_layers(model, patch_layers, "patch_layers")
        self.moe_layers = moe
        layers = [m.layer for m in moe]
        if tables is None:
            if self.config.routing_stats_path:
                tables = tables_for_stats(self.config.routing_stats_path, model, self.adapter, self.config,
                                          layers=layers, allow_test_split=self.config.allow_test_split)
            else:
                tables = VARTables.empty(model, self.adapter, layers)
        else:
            tables.check_model(model, self.adapter)
        self.tables = tables
        self.reset_row_counts()
        self.originals = {m.layer: getattr(m.block, m.router_attr) for m in moe}
        self.routers: dict[int, VARRouter] = {}
        for m in moe:
            if m.layer not in tables.layers:
                raise InvalidInputError(f"VAR tables have no table for MoE layer {m.layer} "
                                        f"(they hold {sorted(tables.layers)})")
            self.routers[m.layer] = VARRouter(self.originals[m.layer], m.layer, self.adapter, self.config,
                                              tokens=lambda: self.tracker.current)
        first = next(iter(self.routers.values()))
        self.stack = TableStack(tables.layers, layers, self.config, self.adapter.num_experts,
                                {l: r.weight_scale for l, r in self.routers.items()}, first.device, first.index_dtype,
                                pair_tier=tables.pair_tier)
        # pair entries need the previous token (kept across decode steps by the tracker); without
        # them the tracker keeps no context
        self.tracker = TokenTracker(model, window=1 if self.stack.has_pairs else 0)
        self.stack.on_rows = self._on_fast_rows
        for r in self.routers.values():
            r.attach(self.stack)
        self._set_var(self.config.enable_var)
        self._installed = False
        self._ep_flags: dict[int, bool] = {}
        self.install()

    # -- patching --------------------------------------------------------------------------------
    def install(self) -> None:
        if self._installed:
            return
        self.tracker.attach()
        for m in self.moe_layers:
            setattr(m.block, m.router_attr, self.routers[m.layer])
            if self.config.adaptive_k and hasattr(m.experts, "_is_expert_parallel"):
                # Index E (the empty slot) is skipped by the eager experts, but the grouped_mm /
                # batched_mm kernels only mask such sentinel rows when this flag is set; without it
                # they leave them uninitialised (NaN * 0 = NaN). Set while VAR is installed.
                self._ep_flags[m.layer] = m.experts._is_expert_parallel
                m.experts._is_expert_parallel = True
        self._installed = True

    def restore(self) -> None:
        """Put the original router modules back and detach the token tracker (idempotent)."""
        if not self._installed:
            return
        for m in self.moe_layers:
            setattr(m.block, m.router_attr, self.originals[m.layer])
            if m.layer in self._ep_flags:
                m.experts._is_expert_parallel = self._ep_flags.pop(m.layer)
        self.tracker.detach()
        self._installed = False

    @contextlib.contextmanager
    def suspended(self) -> Iterator[Any]:
        """The unmodified model (original routers, no hooks) inside the block; VAR back afterwards."""
        was = self._installed
        self.restore()
        try:
            yield self.model
        finally:
            if was:
                self.install()

    def __enter__(self) -> "VARModelWrapper":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    # -- switching ---------------------------------------------------------------------------------
    def enable_var(self) -> None:
        self._set_var(True)

    def disable_var(self) -> None:
        self._set_var(False)

    def _set_var(self, on: bool) -> None:
        """Every router's switch; the stack resolves each forward's one-row steps as it starts only
        while VAR routes (its counters count routed tokens only)."""
        for r in self.routers.values():
            r.enabled = on
        self.stack.step_rows = None
        self.tracker.on_batch = self.stack.begin_forward if on else None

    @property
    def var_enabled(self) -> bool:
        return any(r.enabled for r in self.routers.values())

    def set_audit(self, on: bool) -> None:
        """Audit mode: compute the learned router for every fast row and count agreement."""
        for r in self.routers.values():
            r.audit = on

    def reset_stats(self) -> None:
        if self._rows_since is not None:  # bank the row's counts: they live in the counters being reset
            self._fast_valid_B2 += self._totals_12() - self._rows_since
            self._rows_since.zero_()  # where the reset counters start
        self.stack.reset_counts()

    @contextlib.contextmanager
    def frozen_tables(self) -> Iterator[None]:
        """No demotion is applied inside the block (queued ones wait): for timed or replayed passes."""
        was = self.stack.frozen
        self.stack.frozen = True
        try:
            yield
        finally:
            self.stack.frozen = was

    # -- running -----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    __call__ = forward

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    # -- accounting --------------------------------------------------------------------------------
    def _on_fast_rows(self, look: Any) -> None:
        """Per batch row, table decisions summed over layers (`look.fast_LT` is already False for
        padding) and valid tokens, accumulated raw; `row_tier_counts` turns them into fast / learned.
        One row (batch-1 decoding, every step): the row's counts are the stack's own running
        counters since the row's record began, so a step adds nothing here; the start is
        remembered once (`_rows_since`), and `reset_stats` banks what the row counted."""
        tok = look.tokens
        b, s = tok.batch_size, tok.seq_len
        dev = self.stack.counts_LC.device
        if b == 1 and self.config.track_performance:
            if self._rows_since is None:  # a one-row record begins
                self._fast_valid_B2 = torch.zeros(1, 2, dtype=torch.long, device=dev)  # banked counts
                this_12 = torch.stack([look.fast_LT.sum(), tok.valid_T.to(dev).sum()]).reshape(1, 2)
                self._rows_since = self._totals_12() - this_12  # the lookup already counted this forward
            return
        self._rows_since = None
        if self._fast_valid_B2 is None or self._fast_valid_B2.shape[0] != b:
            self._fast_valid_B2 = torch.zeros(b, 2, dtype=torch.long, device=dev)
        fast_B = look.fast_LT.reshape(-1, b, s).sum((0, 2))
        self._fast_valid_B2 += torch.stack([fast_B, tok.valid_T.to(dev).reshape(b, s).sum(1)], 1)

    def _totals_12(self) -> torch.Tensor:
        """The stack's running (fast decisions summed over layers, valid tokens), shape (1, 2)."""
        fast_L, valid = self.stack.lookup_counts()
        return torch.stack([fast_L.sum(), valid]).reshape(1, 2)

    def row_tier_counts(self) -> torch.Tensor:
        """(B, len(TIERS)) fast/learned counts per batch row since `reset_row_counts()`, valid
        tokens, summed over layers (a new batch size starts a new tensor)."""
        if self._fast_valid_B2 is None:
            return torch.zeros(0, len(TIERS), dtype=torch.long)
        acc_B2 = self._fast_valid_B2
        if self._rows_since is not None:  # one row, counted by the stack's counters
            acc_B2 = acc_B2 + self._totals_12() - self._rows_since
        fast_B, valid_B = acc_B2.cpu().unbind(1)
        return torch.stack([fast_B, valid_B * len(self.stack.layers) - fast_B], 1)

    def last_fast_rows(self) -> torch.Tensor | None:
        """(layers, rows) bool: the rows the tables served (token or pair entries) in the forward that
        ran last; None when VAR is off or no lookup ran for that forward."""
        look = self.stack._last
        if not self.var_enabled or look is None or look.tokens is not self.tracker.current:
            return None
        return look.fast_LT

    def reset_row_counts(self) -> None:
        self._fast_valid_B2: torch.Tensor | None = None  # (B, 2) fast decisions, valid tokens
        self._rows_since: torch.Tensor | None = None  # (1, 2) the stack's totals when a one-row record began

    def _counts(self) -> dict[int, list[int]]:
        return dict(zip(self.stack.layers, self.stack.counts().cpu().tolist()))

    def tier_counts(self) -> dict[tuple[int, str], int]:
        return {(l, t): c[C[t]] for l, c in self._counts().items() for t in TIERS}

    def verification_counts(self) -> dict[tuple[int, str], int]:
        return {(l, o): c[C[f"shadow_{o}"]] for l, c in self._counts().items() for o in ("agree", "disagree")}

    def table_sizes(self) -> dict[int, int]:
        self.stack.apply_demotions()
        return dict(zip(self.stack.layers, map(int, self.stack.member_LV.sum(1).cpu().tolist())))

    def get_performance_stats(self) -> dict[str, Any]:
        counts, sizes = self._counts(), self.table_sizes()
        per_layer = {str(l): _summary(c) | {"table_size": sizes[l]} for l, c in counts.items()}
        total = [sum(col) for col in zip(*counts.values())]
        overall = _summary(total) | {"table_size": sum(sizes.values()), "var_enabled": self.var_enabled}
        return {"layers": per_layer, "overall": overall}

    def print_performance_summary(self) -> None:
        s = self.get_performance_stats()
        o = s["overall"]
        print("VAR performance summary")
        print(f"  routed tokens x layers: {o['calls']}   VAR {'on' if o['var_enabled'] else 'off'}")
        for t in TIERS:
            print(f"  {t:8s}: {100 * o['routing_distribution'][t]:5.1f}%")
        print(f"  table entries: {o['table_size']}")
        if note := self.tables.uncertified_note():
            print(f"  {note}")
        if o["shadow_checked"]:
            print(f"  shadow agreement: {100 * o['shadow_agreement']:.1f}% of {o['shadow_checked']}  demoted: {o['demoted']}")
        for l, d in s["layers"].items():
            dist = " ".join(f"{t}={100 * d['routing_distribution'][t]:.1f}%" for t in TIERS)
            print(f"  layer {l}: {dist} table={d['table_size']}")

    def save_performance_stats(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.get_performance_stats(), indent=2) + "\n", encoding="utf-8")
        return p


def _summary(c: list[int]) -> dict[str, Any]:
    calls = sum(c[C[t]] for t in TIERS)
    checked = c[C["shadow_agree"]] + c[C["shadow_disagree"]]
    out = {
        "calls": calls,
        "forwards": c[C["forwards"]],
        "tier_counts": {t: c[C[t]] for t in TIERS},
        "routing_distribution": {t: c[C[t]] / calls if calls else 0.0 for t in TIERS},
        "shadow_checked": checked,
        "shadow_agreement": c[C["shadow_agree"]] / checked if checked else None,
        "demoted": c[C["demoted"]],
        "adaptive_single": c[C["adaptive_single"]],
        "fast_pair": c[C["fast_pair"]],  # fast rows served by a (previous, token) entry
        "fallback_forwards": c[C["fallback_forwards"]],
    }
    n = c[C["audit_fast_n"]]
    out["audit_fast"] = {"n": n, "exact_agreement": c[C["audit_fast_exact"]] / n if n else None,
                         "overlap": c[C["audit_fast_overlap_x1000"]] / 1000 / n if n else None}
    return out


VARMixtralWrapper = VARModelWrapper
