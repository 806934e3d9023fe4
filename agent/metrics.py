"""The agent's Prometheus metrics, in a registry of their own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.pulls = Counter(
            "fledged_agent_pulls_total",
            "Image pull orders by result (succeeded, already_present, failed, cancelled) "
            "and error category.",
            ["result", "category"],
            registry=self.registry,
        )
        self.runtime_pulls = Counter(
            "fledged_agent_runtime_pulls_total",
            "Pulls sent to the runtime (duplicate orders share one).",
            registry=self.registry,
        )
        self.pull_duration = Histogram(
            "fledged_agent_pull_duration_seconds",
            "Duration of runtime pulls, queueing excluded.",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.bytes_pulled = Counter(
            "fledged_agent_pulled_bytes_total",
            "Bytes of images pulled (as the runtime reports their size).",
            registry=self.registry,
        )
        self.replaced = Counter(
            "fledged_agent_replaced_images",
            "Old content removed after a refresh moved its tag to new content.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fledged_agent_pulls_in_flight", "Runtime pulls running now.", registry=self.registry
        )
        self.pinned_images = Gauge(
            "fledged_agent_pinned_images",
            "Images pinned on this node at the last listing.",
            registry=self.registry,
        )
        self.runtime_up = Gauge(
            "fledged_agent_runtime_up",
            "1 while the container runtime answers, 0 when it does not.",
            registry=self.registry,
        )
