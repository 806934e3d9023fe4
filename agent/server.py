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

from common.lifecycle import kube_client, stop_on_signals
from protos.fledged.agent.v1 import agent_pb2_grpc

from . import __version__
from .config import AgentConfig
from .health import set_status, watch_runtime
from .lease import LeaseRegistrar
from .metrics import AgentMetrics
from .puller import PullManager
from .runtime import Runtime
from .runtime.cri import CriRuntime
from .runtime.docker import DockerRuntime
from .service import AgentService, NodeGuard

log = logging.getLogger(__name__)
SHUTDOWN_GRACE = 10.0


def make_runtime(cfg: AgentConfig) -> Runtime:
    if cfg.runtime == "docker":
        return DockerRuntime(cfg.runtime_endpoint)
    return CriRuntime(cfg.runtime_endpoint, cfg.containerd_namespace)


def server_credentials(cfg: AgentConfig) -> grpc.ServerCredentials | None:
    if not (cfg.tls_cert and cfg.tls_key):
        return None
    client_ca = Path(cfg.tls_client_ca) if cfg.tls_client_ca else None
    return tls_credentials(Path(cfg.tls_cert), Path(cfg.tls_key), client_ca)


def tls_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """With `client_ca`, callers must present a certificate it signed (mTLS)."""
    ca = client_ca.read_bytes() if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def serve(cfg: AgentConfig, register_lease: bool) -> int:
    metrics = AgentMetrics()
    runtime = make_runtime(cfg)
    manager = PullManager(
        runtime, cfg.max_concurrent_pulls, cfg.min_free_disk, cfg.default_pull_deadline, metrics
    )
    server = grpc.aio.server(interceptors=[NodeGuard(cfg.node_name)])
    agent_pb2_grpc.add_AgentServicer_to_server(
        AgentService(manager, runtime, cfg.node_name, metrics), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await set_status(health_servicer, False)  # until the runtime has answered once

    creds = server_credentials(cfg)
    port = (
        server.add_secure_port(cfg.listen, creds) if creds else server.add_insecure_port(cfg.listen)
    )
    await server.start()
    host = cfg.advertise_address or cfg.listen.rsplit(":", 1)[0]
    endpoint = f"{host}:{port}"
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
        mhost, mport = cfg.metrics_listen.rsplit(":", 1)
        start_http_server(int(mport), addr=mhost, registry=metrics.registry)

    stopping = asyncio.Event()
    stop_on_signals(stopping)

    tasks: dict[str, asyncio.Task[None]] = {
        "health": asyncio.create_task(
            watch_runtime(runtime, health_servicer, cfg.health_interval, metrics)
        )
    }
    registrar: LeaseRegistrar | None = None
    if register_lease:
        registrar = LeaseRegistrar(
            kube_client(cfg.kubeconfig),
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
        await asyncio.to_thread(registrar.release)
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
