"""The coordinator's flags: kube-fledged's names and defaults where they exist."""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from common.addresses import shared_port
from common.units import parse_duration


@dataclass(frozen=True)
class CoordinatorConfig:
    kubeconfig: str | None
    image_pull_deadline: float
    refresh_every: float
    always_pull: bool
    agent_namespace: str
    max_concurrent_nodes_per_image: int | None
    byte_progress_max_nodes: int
    leader_elect: bool
    leader_election_namespace: str
    leader_election_id: str
    identity: str
    metrics_bind_address: str | None
    health_probe_bind_address: str | None
    log_format: str
    log_level: str
    agent_tls_ca: Path | None
    agent_tls_cert: Path | None
    agent_tls_key: Path | None
    agent_tls_server_name: str
    agent_tls_auto: bool
    workers: int
    watch_namespace: str | None
    node_gate_taint: str
    node_gate_deadline: float
    node_gate_deadline_text: str
    liveness_stall_timeout: float = 30.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fledged-coordinator",
        description=(
            "Reconciles ImageCache resources (kubefledged.io/v1alpha2) into pull, pin and "
            "remove orders for the kube-fledged agents on the nodes."
        ),
    )
    a = p.add_argument
    a("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="kubeconfig (default: in-cluster)")
    a("--image-pull-deadline-duration", default="5m", help="maximum duration of one image pull")
    a(
        "--image-cache-refresh-frequency",
        default="15m",
        help="re-check every cache this often (mutable tags re-pulled on drift); 0s: off",
    )
    a(
        "--image-pull-policy",
        choices=["IfNotPresent", "Always"],
        default="IfNotPresent",
        help="Always: pull even when an image is already on the node at first sync",
    )
    a(
        "--agent-namespace",
        default=os.environ.get("FLEDGED_NAMESPACE", "kube-fledged"),
        help="namespace of the agents' Leases (and of the TLS Secrets)",
    )
    a(
        "--max-concurrent-nodes-per-image",
        type=int,
        default=0,
        help="wave size: nodes pulling one image at once, cluster-wide (0: unlimited)",
    )
    a(
        "--byte-progress-max-nodes",
        type=int,
        default=1000,
        help="caches on more nodes than this get only each pull's outcome from the agents, "
        "not its byte progress (keeps the event rate of large fleets down); 0: never",
    )
    a("--leader-elect", action="store_true", help="elect a leader among replicas on a Lease")
    a("--leader-election-namespace", default=None, help="default: the agent namespace")
    a("--leader-election-id", default="kube-fledged-coordinator", help="name of the leader Lease")
    a("--metrics-bind-address", default=":8080", help="Prometheus metrics; empty to disable")
    a("--health-probe-bind-address", default=":8081", help="/healthz and /readyz; empty to disable")
    a(
        "--liveness-stall-timeout",
        default="30s",
        help="/healthz fails once the event loop has not turned for this long (a wedged loop)",
    )
    a("--log-format", choices=["json", "text"], default="text", help="log lines as text or JSON")
    a("--log-level", default="info", help="debug, info, warning or error")
    a("--agent-tls-ca", type=Path, help="CA that agent server certificates chain to (enables mTLS)")
    a("--agent-tls-cert", type=Path, help="client certificate for the agent channel")
    a("--agent-tls-key", type=Path, help="client key for the agent channel")
    a("--agent-tls-server-name", default="fledged-agent", help="name in the agents' certificates")
    a(
        "--agent-tls-auto",
        action="store_true",
        help="create (or reuse) the agent CA and certificates as Secrets in --agent-namespace",
    )
    a("--workers", type=int, default=4, help="queue workers (caches and nodes) on the event loop")
    a("--watch-namespace", default=None, help="only serve ImageCaches in this namespace")
    a(
        "--node-gate-taint",
        default="",
        help="node readiness gating: remove this taint (key) from a node once it holds every "
        "image the caches select for it; empty: off",
    )
    a(
        "--node-gate-deadline",
        default="10m",
        help="remove the gating taint anyway this long after the Node was created",
    )
    return p


def parse_args(argv: list[str] | None = None) -> CoordinatorConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    tls = (ns.agent_tls_ca, ns.agent_tls_cert, ns.agent_tls_key)
    if any(tls) and not all(tls):
        parser.error("--agent-tls-ca, --agent-tls-cert and --agent-tls-key go together")
    if any(tls) and ns.agent_tls_auto:
        parser.error("--agent-tls-auto makes its own certificates: drop the --agent-tls-* files")
    try:
        deadline = parse_duration(ns.image_pull_deadline_duration)
        refresh = parse_duration(ns.image_cache_refresh_frequency)
        gate_deadline = parse_duration(ns.node_gate_deadline)
        stall = parse_duration(ns.liveness_stall_timeout)
        clash = shared_port(
            {
                "--metrics-bind-address": ns.metrics_bind_address,
                "--health-probe-bind-address": ns.health_probe_bind_address,
            }
        )
    except ValueError as err:
        parser.error(str(err))
    if clash:
        parser.error(clash)
    return CoordinatorConfig(
        kubeconfig=ns.kubeconfig,
        image_pull_deadline=deadline,
        refresh_every=refresh,
        always_pull=ns.image_pull_policy == "Always",
        agent_namespace=ns.agent_namespace,
        max_concurrent_nodes_per_image=ns.max_concurrent_nodes_per_image or None,
        byte_progress_max_nodes=ns.byte_progress_max_nodes,
        leader_elect=ns.leader_elect,
        leader_election_namespace=ns.leader_election_namespace or ns.agent_namespace,
        leader_election_id=ns.leader_election_id,
        identity=f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}",
        metrics_bind_address=ns.metrics_bind_address or None,
        health_probe_bind_address=ns.health_probe_bind_address or None,
        liveness_stall_timeout=stall,
        log_format=ns.log_format,
        log_level=ns.log_level.upper(),
        agent_tls_ca=ns.agent_tls_ca,
        agent_tls_cert=ns.agent_tls_cert,
        agent_tls_key=ns.agent_tls_key,
        agent_tls_server_name=ns.agent_tls_server_name,
        agent_tls_auto=ns.agent_tls_auto,
        workers=ns.workers,
        watch_namespace=ns.watch_namespace,
        node_gate_taint=ns.node_gate_taint,
        node_gate_deadline=gate_deadline,
        node_gate_deadline_text=ns.node_gate_deadline,
    )
