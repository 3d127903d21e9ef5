"""Prometheus metrics of the server, on a registry of their own (one per app, so tests can run
several apps in one process). Names are fixed: dashboards and analysis jobs rely on them.

- varmoe_routing_decisions_total{layer,tier,mode}   tier = fast | learned
- varmoe_verification_checks_total{layer,outcome}   shadow checks of fast decisions
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .var_runtime import MODES, OUTCOMES, TIERS, VarRuntime

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, var: VarRuntime):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(VarCollector(var))
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
        self.queue_depth = Gauge("varmoe_queue_depth", "Requests waiting for a batch", registry=r)
        self.batch_size = Histogram("varmoe_batch_size", "Rows per model batch", buckets=BATCH_BUCKETS, registry=r)
        self.requests = Counter("varmoe_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        # Zero-initialise the label sets dashboards divide by, so a rate() exists from the start.
        for mode in MODES:
            self.generated_tokens.labels(mode=mode)
            self.prompt_tokens.labels(mode=mode)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class VarCollector:
    """Exports `VarRuntime`'s counts and mode at scrape time (every label set from the start, so
    a rate() exists before the first request; verification only when VAR exists to verify)."""

    def __init__(self, var: VarRuntime):
        self.var = var

    def describe(self):
        return []  # no fixed samples to check at registration; names are unique in this registry

    def collect(self):
        decisions = CounterMetricFamily("varmoe_routing_decisions", "Routing decisions per MoE layer, tier and mode",
                                        labels=["layer", "tier", "mode"])
        for mode in MODES:
            counts = self.var.tier_counts(mode)
            for layer in self.var.backend.layers:
                for tier in TIERS:
                    decisions.add_metric([str(layer), tier, mode], counts.get((layer, tier), 0))
        yield decisions
        if self.var.backend.available:
            checks = CounterMetricFamily("varmoe_verification_checks", "VAR verification checks per layer and outcome",
                                         labels=["layer", "outcome"])
            counts = self.var.verification_counts()
            for layer in self.var.backend.layers:
                for outcome in OUTCOMES:
                    checks.add_metric([str(layer), outcome], counts.get((layer, outcome), 0))
            yield checks
        yield GaugeMetricFamily("varmoe_var_enabled", "1 when new batches run in VAR mode", value=int(self.var.enabled))
