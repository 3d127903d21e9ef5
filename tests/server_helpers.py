"""Test-only helpers for the server tests (the one launcher is analysis_jobs.server_process).

- `shadowed_var_args(model_dir, tmp)`: serve flags giving the reference model its committed VAR
  tables' config with shadow checks on half of the fast/cached decisions (verification metrics).
- `permissive_var_config()`: VARConfig fields under which a random tiny model (high routing
  entropy) still gets table entries.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from var_moe.var import VARConfig, VARTables


def shadowed_var_args(model_dir: Path, tmp: Path) -> list[str]:
    cfg = dict(VARTables.load(model_dir / "var" / "var_tables.safetensors").metadata.get("config") or {})
    cfg.pop("routing_stats_path", None)
    path = tmp / "var.json"
    path.write_text(json.dumps({**cfg, "shadow_rate": 0.5}))
    return ["--var-config", str(path)]


def permissive_var_config() -> dict:
    names = {f.name for f in fields(VARConfig)}
    cfg = {"frequency_threshold": 1, "target_agreement": 0.05, "shadow_rate": 0.5}
    if "entropy_relative" in names:  # threshold as a share of ln E
        cfg.update(entropy_relative=True, entropy_threshold=1.0)
    return cfg
