"""The coordinator's Prometheus metrics, in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "fledged_coordinator_reconciles_total",
            "ImageCache reconciles by result (success, error).",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "fledged_coordinator_reconcile_duration_seconds",
            "Time to plan one ImageCache (orders are sent asynchronously).",
            registry=self.registry,
        )
        self.node_plans = Counter(
            "fledged_coordinator_node_plans_total",
            "Nodes planned: a node's desired state compared with what it holds.",
            registry=self.registry,
        )
        self.status_writes = Counter(
            "fledged_coordinator_status_writes_total",
            "ImageCache status writes (after debouncing and skipping identical ones).",
            registry=self.registry,
        )
        self.orders = Counter(
            "fledged_coordinator_orders_total",
            "Orders sent to agents, by kind (pull, pin, unpin, remove, cancel), counted per image.",
            ["kind"],
            registry=self.registry,
        )
        self.agents_alive = Gauge(
            "fledged_coordinator_agents_alive",
            "Nodes whose agent holds a live Lease.",
            registry=self.registry,
        )
        self.agents_listed = Gauge(
            "fledged_coordinator_agents_listed",
            "Nodes whose agent's images have been listed: orders can go there.",
            registry=self.registry,
        )
        self.agent_channels = Gauge(
            "fledged_coordinator_agent_channels",
            "gRPC channels open to agent endpoints.",
            registry=self.registry,
        )
        self.gated_nodes = Gauge(
            "fledged_coordinator_gated_nodes",
            "Nodes waiting behind node readiness gating's taint for their cached images.",
            registry=self.registry,
        )
        self.is_leader = Gauge(
            "fledged_coordinator_is_leader",
            "1 while this replica leads (or runs without leader election).",
            registry=self.registry,
        )
