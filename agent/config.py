"""The agent's settings: command-line flags, each with an environment variable of the
same meaning (FLEDGED_<FLAG>, for the DaemonSet), parsed into one frozen dataclass."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Literal

from common.addresses import shared_port
from common.units import parse_duration, parse_size


@dataclass(frozen=True)
class DiskThreshold:
    """Minimum free space on the image filesystem: a share of it, or bytes."""

    percent: float | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> DiskThreshold:
        text = text.strip()
        if text.endswith("%"):
            value = float(text[:-1])
            if not 0 <= value < 100:
                raise ValueError(f"--min-free-disk percent out of range: {text}")
            return cls(percent=value)
        return cls(bytes=parse_size(text))

    def required(self, capacity: int) -> int:
        if self.percent is not None:
            return int(capacity * self.percent / 100)
        return self.bytes or 0

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.bytes} bytes"


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    listen: str
    advertise_address: str | None
    runtime: Literal["cri", "docker"]
    runtime_endpoint: str
    containerd_namespace: str
    max_concurrent_pulls: int
    min_free_disk: DiskThreshold
    default_pull_deadline: float
    metrics_listen: str | None
    health_listen: str | None
    tls_cert: str | None
    tls_key: str | None
    tls_client_ca: str | None
    kubeconfig: str | None
    namespace: str
    lease_renew_interval: float
    lease_duration: float
    health_interval: float
    log_format: Literal["json", "text"]
    log_level: str
    credential_provider_config: str | None = None
    credential_provider_bin_dir: str | None = None
    node_docker_config: str | None = None

    def endpoint(self, port: int) -> str:
        """host:port the coordinator dials, as published in the Lease (`port`: the one
        bound, which --listen may leave to the system). An IPv6 address goes in
        brackets: unbracketed, gRPC dials it as a bare host on port 443, and no agent
        of an IPv6 cluster could be reached."""
        host = self.advertise_address or self.listen.rsplit(":", 1)[0]
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{port}"


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get("FLEDGED_" + flag.upper().replace("-", "_"), default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fledged-agent",
        description=(
            "Pulls, pins and removes images on this node through its container runtime, "
            "on orders from the kube-fledged coordinator. Every flag can also be set by "
            "the environment variable FLEDGED_<FLAG> (e.g. FLEDGED_NODE_NAME)."
        ),
    )
    a = p.add_argument
    a("--node-name", default=_env("node-name"), help="name of the Node this agent serves")
    a("--listen", default=_env("listen", "0.0.0.0:9445"), help="gRPC listen address")
    a(
        "--advertise-address",
        default=_env("advertise-address"),
        help="IP the coordinator dials (default: the listen host); use the pod IP",
    )
    a(
        "--runtime",
        choices=["cri", "docker"],
        default=_env("runtime", "cri"),
        help="cri: containerd, CRI-O, k3s (containerd's own API is used when it answers)",
    )
    a(
        "--runtime-endpoint",
        default=_env("runtime-endpoint", "unix:///run/containerd/containerd.sock"),
        help="runtime socket: containerd, CRI-O, k3s or the Docker socket",
    )
    a(
        "--containerd-namespace",
        default=_env("containerd-namespace", "k8s.io"),
        help="containerd namespace of the kubelet's images",
    )
    a(
        "--max-concurrent-pulls",
        type=int,
        default=int(_env("max-concurrent-pulls", "2") or 2),
        help="runtime pulls at once; the rest wait (reported as Waiting)",
    )
    a(
        "--min-free-disk",
        default=_env("min-free-disk", "15%"),
        help="refuse pulls when the image filesystem has less free space (15%%, 5Gi): at or "
        "above the kubelet's imagefs eviction threshold (15%% by default)",
    )
    a(
        "--default-pull-deadline",
        default=_env("default-pull-deadline", "5m"),
        help="deadline of a pull whose order names none",
    )
    a(
        "--image-credential-provider-config",
        default=_env("image-credential-provider-config"),
        help="the kubelet's credential provider config (its flag of the same name): the "
        "agent runs the same plugins for images no Secret of the cache serves",
    )
    a(
        "--image-credential-provider-bin-dir",
        default=_env("image-credential-provider-bin-dir"),
        help="where those plugins are (the kubelet's flag of the same name)",
    )
    a(
        "--node-docker-config",
        default=_env("node-docker-config"),
        help="the node's docker config the kubelet reads (/var/lib/kubelet/config.json): "
        "its credentials serve images no Secret of the cache serves",
    )
    a("--metrics-listen", default=_env("metrics-listen"), help="Prometheus /metrics address")
    a(
        "--health-listen",
        default=_env("health-listen"),
        help="extra plaintext port serving only grpc.health.v1 (for kubelet probes under mTLS)",
    )
    a("--tls-cert", default=_env("tls-cert"), help="server certificate (enables TLS)")
    a("--tls-key", default=_env("tls-key"), help="server key")
    a("--tls-client-ca", default=_env("tls-client-ca"), help="CA that client certs must chain to")
    a("--kubeconfig", default=_env("kubeconfig"), help="kubeconfig (default: in-cluster)")
    a("--namespace", default=_env("namespace", "kube-fledged"), help="namespace of the Lease")
    a(
        "--no-lease",
        action="store_true",
        default=_env("no-lease") == "true",
        help="do not register a Lease (no Kubernetes API access)",
    )
    a(
        "--lease-renew-interval",
        default=_env("lease-renew-interval", "10s"),
        help="Lease renewal period",
    )
    a(
        "--lease-duration",
        default=_env("lease-duration", "40s"),
        help="how long a Lease outlives its last renewal (then the agent counts as gone)",
    )
    a(
        "--health-interval",
        default=_env("health-interval", "5s"),
        help="runtime health check period",
    )
    a(
        "--log-format",
        choices=["json", "text"],
        default=_env("log-format", "text"),
        help="text or JSON",
    )
    a("--log-level", default=_env("log-level", "info"), help="debug, info, warning or error")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[AgentConfig, bool]:
    """The config and whether a Lease is wanted; exits with usage on bad input."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.node_name:
        parser.error("--node-name (or FLEDGED_NODE_NAME) is required")
    if ns.max_concurrent_pulls < 1:
        parser.error("--max-concurrent-pulls must be at least 1")
    if bool(ns.tls_cert) != bool(ns.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if ns.tls_client_ca and not ns.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if bool(ns.image_credential_provider_config) != bool(ns.image_credential_provider_bin_dir):
        parser.error(
            "--image-credential-provider-config and --image-credential-provider-bin-dir go together"
        )
    try:
        cfg = AgentConfig(
            node_name=ns.node_name,
            listen=ns.listen,
            advertise_address=ns.advertise_address,
            runtime=ns.runtime,
            runtime_endpoint=ns.runtime_endpoint,
            containerd_namespace=ns.containerd_namespace,
            max_concurrent_pulls=ns.max_concurrent_pulls,
            min_free_disk=DiskThreshold.parse(ns.min_free_disk),
            default_pull_deadline=parse_duration(ns.default_pull_deadline),
            metrics_listen=ns.metrics_listen,
            health_listen=ns.health_listen,
            tls_cert=ns.tls_cert,
            tls_key=ns.tls_key,
            tls_client_ca=ns.tls_client_ca,
            kubeconfig=ns.kubeconfig,
            namespace=ns.namespace,
            lease_renew_interval=parse_duration(ns.lease_renew_interval),
            lease_duration=parse_duration(ns.lease_duration),
            health_interval=parse_duration(ns.health_interval),
            log_format=ns.log_format,
            log_level=ns.log_level.upper(),
            credential_provider_config=ns.image_credential_provider_config,
            credential_provider_bin_dir=ns.image_credential_provider_bin_dir,
            node_docker_config=ns.node_docker_config,
        )
        clash = shared_port(
            {
                "--listen": cfg.listen,
                "--metrics-listen": cfg.metrics_listen,
                "--health-listen": cfg.health_listen,
            }
        )
    except ValueError as err:
        parser.error(str(err))
    if clash:
        parser.error(clash)
    return cfg, not ns.no_lease
