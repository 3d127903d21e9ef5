"""Prometheus metrics of the server, on a registry of their own (one per app, so tests can run
several apps in one process). Names are fixed: dashboards and analysis jobs rely on them.

- varmoe_routing_decisions_total{layer,tier}        tier = fast | cached | learned
- varmoe_verification_checks_total{layer,outcome}   outcomes as reported by the VAR router
- varmoe_generated_tokens_total{mode}, varmoe_prompt_tokens_total{mode}   mode = var | baseline
- varmoe_request_duration_seconds{endpoint,mode}    histogram
- varmoe_time_to_first_token_seconds{mode}          histogram
- varmoe_var_enabled, varmoe_queue_depth            gauges
- varmoe_batch_size                                 histogram (rows per model batch)
- varmoe_requests_total{endpoint,status}            every HTTP answer, errors included

Test: `pytest tests/test_server_metrics.py` (runs `promtool check metrics` on the exposition).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MODES = ("var", "baseline")
TIERS = ("fast", "cached", "learned")
OUTCOMES = ("agree", "disagree")  # shadow checks of fast / cached decisions by the learned router
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, moe_layers: list[int] | None = None, verification: bool = False):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.routing_decisions = Counter(
            "varmoe_routing_decisions_total", "Routing decisions per MoE layer and tier", ["layer", "tier"], registry=r
        )
        self.verification_checks = Counter(
            "varmoe_verification_checks_total", "VAR verification checks per layer and outcome",
            ["layer", "outcome"], registry=r,
        )
        self.generated_tokens = Counter("varmoe_generated_tokens", "Generated tokens", ["mode"], registry=r)
        self.prompt_tokens = Counter("varmoe_prompt_tokens", "Prompt tokens processed", ["mode"], registry=r)
        self.request_duration = Histogram(
            "varmoe_request_duration_seconds", "Model request latency", ["endpoint", "mode"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "varmoe_time_to_first_token_seconds", "Time to first generated token", ["mode"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.var_enabled = Gauge("varmoe_var_enabled", "1 when new batches run in VAR mode", registry=r)
        self.queue_depth = Gauge("varmoe_queue_depth", "Requests waiting for a batch", registry=r)
        self.batch_size = Histogram("varmoe_batch_size", "Rows per model batch", buckets=BATCH_BUCKETS, registry=r)
        self.requests = Counter("varmoe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        # Zero-initialise the label sets dashboards divide by, so a rate() exists from the start.
        for mode in MODES:
            self.generated_tokens.labels(mode=mode)
            self.prompt_tokens.labels(mode=mode)
        for layer in moe_layers or []:
            for tier in TIERS:
                self.routing_decisions.labels(layer=str(layer), tier=tier)
            if verification:  # only when a VAR router exists to verify anything
                for outcome in OUTCOMES:
                    self.verification_checks.labels(layer=str(layer), outcome=outcome)

    def add_routing(self, tier_counts: dict[tuple[int, str], int]) -> None:
        for (layer, tier), n in tier_counts.items():
            if n:
                self.routing_decisions.labels(layer=str(layer), tier=tier).inc(n)

    def add_verification(self, outcome_counts: dict[tuple[int, str], int]) -> None:
        for (layer, outcome), n in outcome_counts.items():
            if n:
                self.verification_checks.labels(layer=str(layer), outcome=outcome).inc(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
