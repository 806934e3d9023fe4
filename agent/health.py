"""The standard gRPC health service, SERVING only while the runtime answers.

The kubelet's native gRPC probes read it, so a node whose runtime is down shows an
unready agent instead of one that accepts orders it cannot carry out. Liveness asks
for its own service, SERVING whenever the agent's event loop answers: a restart cannot
bring a runtime back, and a kubelet that killed the agent for it restarted it for
nothing once the runtime returned.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from .metrics import AgentMetrics
from .runtime import Runtime

log = logging.getLogger(__name__)
AGENT_SERVICE = "fledged.agent.v1.Agent"
SERVICES = ("", AGENT_SERVICE)
LIVENESS_SERVICE = "liveness"


async def start_health(servicer: health.aio.HealthServicer) -> None:
    """Alive from now on; ready once the runtime has answered."""
    await servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await set_status(servicer, False)


async def set_status(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in SERVICES:
        await servicer.set(name, status)


async def watch_runtime(
    runtime: Runtime,
    servicer: health.aio.HealthServicer,
    interval: float,
    metrics: AgentMetrics,
) -> None:
    """Runs until cancelled; logs each change of state once."""
    serving: bool | None = None
    while True:
        try:
            await asyncio.wait_for(runtime.info(), timeout=max(1.0, interval))
            now = True
        except Exception as err:  # any failure to answer means not serving
            now = False
            if serving is not False:
                log.warning("container runtime does not answer: %s", err)
        if now != serving:
            if now:
                log.info("container runtime answers: SERVING")
            await set_status(servicer, now)
            metrics.runtime_up.set(1 if now else 0)
            serving = now
        await asyncio.sleep(interval)
