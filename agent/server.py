"""Wires the agent together and owns its lifecycle: start, serve, drain, stop.

Every background task is owned here; if one dies unexpectedly the agent logs it and
exits non-zero rather than limping on (the DaemonSet restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import start_http_server

from common.addresses import split_address
from common.lifecycle import stop_on_signals
from protos.fledged.agent.v1 import agent_pb2_grpc

from . import __version__
from .config import AgentConfig
from .health import start_health, watch_runtime
from .kubeapi import ApiConfigError, ApiTarget, api_target
from .lease import LeaseRegistrar
from .metrics import AgentMetrics
from .nodeconfig import NodeDockerConfig
from .puller import NodeLookup, PullManager, all_of
from .runtime import Runtime
from .runtime.cri import CriRuntime
from .service import AgentService, NodeGuard

log = logging.getLogger(__name__)
SHUTDOWN_GRACE = 10.0


def make_runtime(cfg: AgentConfig) -> Runtime:
    if cfg.runtime == "docker":
        # Imported only here: the Docker SDK and requests are ~7 MiB a CRI node needn't hold.
        from .runtime.docker import DockerRuntime

        return DockerRuntime(cfg.runtime_endpoint)
    return CriRuntime(cfg.runtime_endpoint, cfg.containerd_namespace)


def server_credentials(cfg: AgentConfig) -> grpc.ServerCredentials | None:
    if not (cfg.tls_cert and cfg.tls_key):
        return None
    client_ca = Path(cfg.tls_client_ca) if cfg.tls_client_ca else None
    return tls_credentials(Path(cfg.tls_cert), Path(cfg.tls_key), client_ca)


def tls_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """With `client_ca`, callers must present a certificate it signed (mTLS). The files
    are read again at each new connection's handshake: a certificate the coordinator
    issued anew (before expiry, or from a new CA) reaches the DaemonSet's mounted Secret
    within a minute or two and is served from then on, with no restart."""
    files = CertificateFiles(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(),
        files.changed,  # type: ignore[arg-type]  # None means "unchanged" (gRPC's docs)
        require_client_authentication=client_ca is not None,
    )


class CertificateFiles:
    """The serving certificate, its key and the client CA, as last loaded."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._paths = (cert, key, client_ca)
        self._loaded = self._read()

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        cert, key, ca = self._paths
        return cert.read_bytes(), key.read_bytes(), ca.read_bytes() if ca is not None else None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self._loaded
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration if the files changed, else None (kept).
        Files caught mid-update (unreadable, or a key that is not the certificate's)
        keep the last good ones until the next handshake."""
        try:
            now = self._read()
        except OSError as err:
            log.warning("TLS files unreadable (%s); serving the ones loaded before", err)
            return None
        if now == self._loaded:
            return None
        if not _key_matches(now[0], now[1]):
            log.warning("TLS certificate and key do not match (mid-update?); not loaded yet")
            return None
        self._loaded = now
        log.info("TLS certificate files changed: serving the new ones")
        return self.configuration()


def _key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    # Imported here: read only when the files change, and the library costs every
    # node's agent ~8 MiB of memory from its start.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return False
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.PEM
    return bool(
        cert.public_key().public_bytes(encoding, public)
        == key.public_key().public_bytes(encoding, public)
    )


async def serve(cfg: AgentConfig, register_lease: bool) -> int:
    target: ApiTarget | None = None
    if register_lease:
        try:
            target = api_target(cfg.kubeconfig)
        except ApiConfigError as err:
            log.error("cannot register the agent's Lease: %s", err)
            return 2
    lookups: list[NodeLookup] = []
    if cfg.node_docker_config:
        lookups.append(NodeDockerConfig(Path(cfg.node_docker_config)).lookup)
    if cfg.credential_provider_config and cfg.credential_provider_bin_dir:
        # Imported only here, with YAML: every other node's agent is spared both.
        from .credproviders import ConfigError, NodeCredentials, config_summary

        try:
            providers = NodeCredentials.from_files(
                Path(cfg.credential_provider_config), Path(cfg.credential_provider_bin_dir)
            )
        except ConfigError as err:
            log.error("%s", err)
            return 2
        log.info("credential provider plugins: %s", config_summary(providers.providers))
        lookups.append(providers.lookup)
    metrics = AgentMetrics()
    runtime = make_runtime(cfg)
    manager = PullManager(
        runtime,
        cfg.max_concurrent_pulls,
        cfg.min_free_disk,
        cfg.default_pull_deadline,
        metrics,
        node_credentials=all_of(lookups) if lookups else None,
    )
    server = grpc.aio.server(interceptors=[NodeGuard(cfg.node_name)])
    agent_pb2_grpc.add_AgentServicer_to_server(
        AgentService(manager, runtime, cfg.node_name, metrics), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await start_health(health_servicer)

    creds = server_credentials(cfg)
    port = (
        server.add_secure_port(cfg.listen, creds) if creds else server.add_insecure_port(cfg.listen)
    )
    await server.start()
    endpoint = cfg.endpoint(port)
    log.info(
        "agent %s for node %s serving on %s (%s, runtime %s at %s)",
        __version__,
        cfg.node_name,
        endpoint,
        "mTLS" if cfg.tls_client_ca else "TLS" if creds else "plaintext",
        cfg.runtime,
        cfg.runtime_endpoint,
    )
    health_server = None
    if cfg.health_listen:
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_server.add_insecure_port(cfg.health_listen)
        await health_server.start()
    if cfg.metrics_listen:
        mhost, mport = split_address(cfg.metrics_listen)
        start_http_server(mport, addr=mhost, registry=metrics.registry)

    stopping = asyncio.Event()
    stop_on_signals(stopping)

    tasks: dict[str, asyncio.Task[None]] = {
        "health": asyncio.create_task(
            watch_runtime(runtime, health_servicer, cfg.health_interval, metrics)
        )
    }
    registrar: LeaseRegistrar | None = None
    if target is not None:
        registrar = LeaseRegistrar(
            target,
            cfg.namespace,
            cfg.node_name,
            endpoint,
            creds is not None,
            __version__,
            cfg.lease_duration,
            cfg.lease_renew_interval,
        )
        tasks["lease"] = asyncio.create_task(registrar.run())

    crashed: list[str] = []

    def on_done(name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        log.error("background task %s died: %r; stopping the agent", name, task.exception())
        crashed.append(name)
        stopping.set()

    for name, task in tasks.items():
        task.add_done_callback(functools.partial(on_done, name))

    await stopping.wait()
    await health_servicer.enter_graceful_shutdown()
    if registrar is not None:
        renewals = tasks.pop("lease")
        renewals.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await renewals
        await asyncio.to_thread(registrar.release)  # after a renewal under way, if any
    await server.stop(SHUTDOWN_GRACE)
    if health_server is not None:
        await health_server.stop(1)
    for task in tasks.values():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await manager.close()
    await runtime.close()
    log.info("agent stopped")
    return 1 if crashed else 0
