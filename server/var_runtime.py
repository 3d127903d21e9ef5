"""`VarRuntime`: the one owner of the server's VAR mode and of its routing accounting.

The admin switch (`/var/toggle`) calls `set_enabled(on)`; engines ask `mode_for(pinned)` and report
what a batch did with `record_batch(mode, valid_tokens)`; Prometheus (`server.metrics.VarCollector`)
and `/var/status` (`status()`) read it at request time, and nothing else keeps a copy.

An engine plugs its VAR in through `RoutingBackend` (the VAR part of the engine contract
`server.host.Host`): the builtin engine's `ModelHost`, vLLM's `VllmHost`. Counts are cumulative in the
backend; the runtime attributes what was added since its last read to the mode of the batch that
added it, so VAR's tier shares never include baseline traffic. In baseline mode the learned router
makes every decision: valid tokens x MoE layers under `learned`.
Test: `pytest tests/test_var_runtime.py tests/test_server_api.py`.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from var_moe.errors import InvalidInputError
from var_moe.var.served import TIERS

MODES = ("var", "baseline")
OUTCOMES = ("agree", "disagree")  # shadow checks of fast decisions by the learned router

Counts = dict[tuple[int, str], int]


class VarUnavailable(Exception):
    """VAR mode was asked for but the backend has no VAR (the message says why)."""


class RoutingBackend(Protocol):
    """What an engine's VAR implementation gives the runtime."""

    layers: list[int]  # MoE layer indices, in model order
    unavailable_reason: str  # "" when VAR is available

    @property
    def available(self) -> bool: ...

    def apply_mode(self, var: bool) -> None:
        """Make the routers run in this mode (engine thread, between batches)."""

    def counts(self) -> tuple[Counts, Counts]:
        """Cumulative VAR-mode counts: {(layer, tier): n} and {(layer, outcome): n}."""

    def info(self) -> dict[str, Any]:
        """What /var/status shows of the VAR set-up: config (dict), table_sizes, demoted, tables_source."""


class ModeSwitch:
    """`RoutingBackend.apply_mode` for both hosts, so the rule has one owner: VAR mode needs VAR
    available; a host implements `_switch(var)`, called only where VAR is available and the mode changes."""

    _var_applied = False  # the mode the routers run in

    def apply_mode(self, var: bool) -> None:
        if var == self._var_applied:
            return
        if var and not self.available:
            raise InvalidInputError(self.unavailable_reason)
        if self.available:
            self._switch(var)
        self._var_applied = var


class VarRuntime:
    def __init__(self, backend: RoutingBackend, enabled: bool = True):
        self.backend = backend
        self._lock = threading.Lock()
        self._enabled = bool(enabled and backend.available)
        self._tiers: dict[str, Counts] = {m: {(l, t): 0 for l in backend.layers for t in TIERS} for m in MODES}
        self._verification: Counts = {(l, o): 0 for l in backend.layers for o in OUTCOMES}
        self._batches = dict.fromkeys(MODES, 0)
        self._seen = backend.counts() if backend.available else ({}, {})

    # -- mode -------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """The admin's switch: the mode of batches that are not pinned."""
        return self._enabled

    @property
    def mode(self) -> str:
        return "var" if self._enabled else "baseline"

    def set_enabled(self, on: bool) -> bool:
        """Turn VAR on or off for batches formed from now on; returns the previous setting."""
        if on and not self.backend.available:
            raise VarUnavailable(f"VAR is unavailable: {self.backend.unavailable_reason}")
        with self._lock:
            previous, self._enabled = self._enabled, bool(on)
        return previous

    def mode_for(self, pinned: str | None) -> str:
        """The mode a job runs in: its pinned mode, else the admin's current one."""
        return pinned or self.mode

    # -- accounting -------------------------------------------------------------------------------
    def record_batch(self, mode: str, valid_tokens: int, new_batch: bool = True, read_counts: bool = True) -> None:
        """Attribute what the batch just run added to `mode` (engine thread, after the batch, or after
        each segment of a batch that rows join and leave: `new_batch` False for the later ones).
        `read_counts=False` defers reading the backend's VAR counts to a later `pull_counts()` (for a
        backend whose counters count VAR-mode work only, where a read costs a round trip)."""
        with self._lock:
            self._batches[mode] += int(new_batch)
            if mode == "baseline":
                for layer in self.backend.layers:
                    self._tiers["baseline"][(layer, "learned")] += int(valid_tokens)
                return
            if read_counts:
                self._pull()

    def pull_counts(self) -> None:
        """Read the backend's counters and attribute what they added since the last read to VAR mode
        (engine thread; only valid when everything added since then was VAR-mode work)."""
        with self._lock:
            self._pull()

    def _pull(self) -> None:
        tiers, verification = self.backend.counts()
        seen_tiers, seen_verification = self._seen
        for key, n in tiers.items():
            self._tiers["var"][key] = self._tiers["var"].get(key, 0) + int(n) - int(seen_tiers.get(key, 0))
        for key, n in verification.items():
            self._verification[key] = self._verification.get(key, 0) + int(n) - int(seen_verification.get(key, 0))
        self._seen = (dict(tiers), dict(verification))

    def tier_counts(self, mode: str | None = None) -> Counts:
        """Cumulative routing decisions {(layer, tier): n} of one mode, or of both summed."""
        with self._lock:
            if mode is not None:
                return dict(self._tiers[mode])
            out: Counts = {}
            for m in MODES:
                for key, n in self._tiers[m].items():
                    out[key] = out.get(key, 0) + n
            return out

    def verification_counts(self) -> Counts:
        with self._lock:
            return dict(self._verification)

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Mode, the VAR set-up (its config's enable_var is the current mode), shares per mode."""
        var: dict[str, Any] = {"available": self.backend.available, "layers": self.backend.layers}
        if not self.backend.available:
            var["unavailable_reason"] = self.backend.unavailable_reason
        else:
            info = dict(self.backend.info())
            if isinstance(info.get("config"), dict):
                info["config"] = {**info["config"], "enable_var": self.enabled}
            var.update(info)
        layers = self.backend.layers
        decisions = {m: _by_layer(self.tier_counts(m), layers, TIERS) for m in MODES}
        checks = _by_layer(self.verification_counts(), layers, OUTCOMES)
        return {
            "mode": self.mode,
            "var": var,
            "decisions_since_start": decisions,
            "tier_shares_since_start": {m: {l: _shares(c) for l, c in d.items()} for m, d in decisions.items()},
            "batches_since_start": dict(self._batches),
            "verification_checks_since_start": checks,
            "verification_agreement": {l: (c["agree"] / sum(c.values()) if sum(c.values()) else None)
                                       for l, c in checks.items()},
        }


def _by_layer(counts: Counts, layers: list[int], keys: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {str(l): {k: counts.get((l, k), 0) for k in keys} for l in layers}


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: (n / total if total else 0.0) for k, n in counts.items()}
