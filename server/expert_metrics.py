"""Expert load in `/metrics`: the engine's device counters (var_moe/expert_load.py), read once per
scrape and turned into sliding-window gauges with a bounded number of series.

Default (setting expert_load_metrics, on), per MoE layer:
- varmoe_expert_load_imbalance{layer}       tokens of the busiest expert / mean tokens per expert
- varmoe_expert_load_hottest_share{layer}   the busiest expert's share of routed slots
- varmoe_expert_load_dead_experts{layer}    experts that received no token in the window
- varmoe_routing_entropy_nats{layer}        mean routing entropy per token (maximum ln E)
- varmoe_expert_load_window_tokens          routed tokens in the window (one series; 0 = idle, the
                                            ratios are then NaN and every expert counts as dead)
and, on an engine that counts per VAR tier, varmoe_expert_load_tier_imbalance{layer,tier}.
That is 4 series per MoE layer (+ one per tier), plus two: the window's tokens and
varmoe_expert_load_counting (0 while an admin has paused the counting with `POST /admin/expert-load`,
which the builtin engine allows at run time; the gauges are then left out).
With expert_load_per_expert: varmoe_expert_tokens_total{layer,expert}, cumulative routed slots,
MoE layers x experts series (its help line states the count) -- what a layer x expert heat map needs.

The window is `expert_load_window_s`, measured between scrapes (`LoadWindow`): the gauges describe
the traffic between the oldest reading kept and this scrape. The /metrics route takes the reading
(`ServerState.refresh_expert_load`), so collecting never touches the device.
Test: `pytest tests/test_server_metrics.py tests/test_server_expert_load.py`.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from var_moe.expert_load import LoadReading, LoadWindow


class ExpertLoadCollector:
    def __init__(self, layers: list[int], num_experts: int, tiers: tuple[str, ...], window_s: float,
                 per_expert: bool):
        self.layers, self.num_experts, self.tiers = list(layers), int(num_experts), tuple(tiers)
        self.per_expert = per_expert
        self.window = LoadWindow(window_s)
        self.reading: LoadReading | None = None  # the latest reading, set before each exposition
        self.counting = True  # False while paused (POST /admin/expert-load)

    def set_counting(self, on: bool, base: LoadReading | None = None) -> None:
        """Pause (no gauges until resumed) or resume with a new window that starts at `base`, the
        counters as counting resumed (without it the first scrape would span everything since start)."""
        self.counting, self.reading = on, None
        self.window = LoadWindow(self.window.window_s, self.window.clock)
        if base is not None:
            self.window.update(base)

    def describe(self):
        return []

    def collect(self):
        yield GaugeMetricFamily("varmoe_expert_load_counting", "1 while expert load is counted, 0 while paused "
                                "(POST /admin/expert-load)", value=int(self.counting))
        r = self.reading
        if r is None:
            return
        st = self.window.update(r)
        labels = [str(l) for l in self.layers]
        gauges = (
            ("varmoe_expert_load_imbalance", "Tokens of the busiest expert over the mean per expert, per MoE layer "
                                             "(sliding window; 1 = even)", st.imbalance_L),
            ("varmoe_expert_load_hottest_share", "The busiest expert's share of routed slots per MoE layer "
                                                 "(sliding window)", st.hottest_share_L),
            ("varmoe_expert_load_dead_experts", "Experts without a routed token in the sliding window, per MoE layer",
             st.dead_L),
            ("varmoe_routing_entropy_nats", f"Mean routing entropy per token and MoE layer, nats (maximum "
                                            f"ln {self.num_experts}; sliding window)", st.entropy_L),
        )
        for name, help_, values in gauges:
            g = GaugeMetricFamily(name, help_, labels=["layer"])
            for layer, v in zip(labels, values.tolist()):
                g.add_metric([layer], float(v))
            yield g
        yield GaugeMetricFamily("varmoe_expert_load_window_tokens", "Routed tokens in the expert-load sliding window",
                                value=float(st.tokens_L.max()) if st.tokens_L.size else 0.0)
        if st.tier_imbalance_XL is not None and self.tiers:
            g = GaugeMetricFamily("varmoe_expert_load_tier_imbalance", "Expert-load imbalance per MoE layer and VAR "
                                  "tier of the routed rows (sliding window)", labels=["layer", "tier"])
            for tier, row in zip(self.tiers, st.tier_imbalance_XL.tolist()):
                for layer, v in zip(labels, row):
                    g.add_metric([layer, tier], float(v))
            yield g
        if self.per_expert:
            n = len(self.layers) * self.num_experts
            c = CounterMetricFamily("varmoe_expert_tokens", f"Routed slots per MoE layer and expert since start "
                                    f"({n} series: {len(self.layers)} layers x {self.num_experts} experts)",
                                    labels=["layer", "expert"])
            for layer, row in zip(labels, r.counts_LE.tolist()):
                for e, v in enumerate(row):
                    c.add_metric([layer, str(e)], float(v))
            yield c
