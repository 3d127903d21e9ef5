"""Test-only helpers for the server tests (the one launcher is analysis_jobs.server_process).

- `shadowed_var_args(model_dir, tmp)`: serve flags giving the reference model its committed VAR
  tables' config with shadow checks on half of the fast decisions (verification metrics).
- `permissive_var_config()`: VARConfig fields under which a random tiny model (high routing
  entropy) still gets table entries.
- `FakeBackend`: a RoutingBackend whose cumulative counters a test advances by hand.
- `sse_events(text)`, `stream_matches_non_stream(client, prompt)`: the streaming checks both
  engines' server tests share.
- `metric(text, name, **labels)`: the sum of a metric's samples in a /metrics exposition.
- `captured(local, ids)`: [tokens][MoE layers][k] experts of an in-process forward (routed-experts checks).
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


class FakeBackend:
    """Cumulative counters the test advances by hand, like a VAR wrapper's device counters."""

    def __init__(self, available: bool = True):
        self.layers = [0, 2]
        self.unavailable_reason = "" if available else "no tables"
        self._available = available
        self.tiers: dict = {}
        self.verification: dict = {}
        self.applied: list[bool] = []

    @property
    def available(self) -> bool:
        return self._available

    def apply_mode(self, var: bool) -> None:
        self.applied.append(var)

    def counts(self):
        return dict(self.tiers), dict(self.verification)

    def info(self):
        return {"config": {"enable_var": False, "shadow_rate": 0.1}, "table_sizes": {"0": 3, "2": 1}}

    def add(self, **by_key):
        for key, n in by_key.items():
            layer, tier = key.split("_", 1)
            store = self.verification if tier in ("agree", "disagree") else self.tiers
            k = (int(layer[1:]), tier)
            store[k] = store.get(k, 0) + n


def sse_events(text: str) -> list:
    """The data of each server-sent event ("[DONE]" as is, the rest parsed as JSON)."""
    out = []
    for block in text.strip().split("\n\n"):
        data = block.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_matches_non_stream(client, prompt: str) -> list[dict]:
    """Stream a greedy baseline generation and check it against the same request not streamed:
    same text, one token event per generated token, [DONE] last. Returns the token events."""
    req = {"prompt": prompt, "max_new_tokens": 10, "var": False}
    plain = client.post("/v1/generate", json=req).json()
    r = client.post("/v1/generate", json={**req, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    tokens = [e for e in events[:-1] if e["type"] == "token"]
    done = events[-2]
    assert done["type"] == "done" and done["text"] == plain["text"]
    assert len(tokens) == plain["generated_tokens"]
    return tokens


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` carrying all `labels`."""
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def captured(local, ids: list[int]) -> list:
    """[tokens][MoE layers][k] experts of a teacher-forced forward of `ids` (in-process)."""
    import torch

    from var_moe.routing_tap import RoutingTap

    model, _ = local
    tap = RoutingTap(model, count=False).attach()
    tap.recording = True
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    tap.detach()
    return tap.last_LTK.permute(1, 0, 2).tolist()
