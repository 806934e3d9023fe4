"""A node registry whose agents are a stand-in gRPC servicer on loopback, reached
through the coordinator's own AgentPool over real grpc.aio channels."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from coordinator.agents import AgentPool
from coordinator.nodes import NodeRegistry
from protos.fledged.agent.v1 import agent_pb2, agent_pb2_grpc


class EmptyNodeAgent(agent_pb2_grpc.AgentServicer):
    """A stand-in whose node holds nothing: subclasses add the calls a test is about."""

    async def ListImages(self, request: Any, context: Any) -> Any:
        return agent_pb2.ListImagesResponse()

    async def GetNodeInfo(self, request: Any, context: Any) -> Any:
        return agent_pb2.NodeInfo()


@contextlib.asynccontextmanager
async def registry_over(
    servicer: Any,
    endpoints: int = 1,
    on_change: Callable[[str, float], None] = lambda node, delay: None,
    **kwargs: Any,
) -> AsyncIterator[tuple[NodeRegistry, list[str]]]:
    """The registry and `endpoints` addresses of the servicer, all stopped after."""
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)
    addresses = [f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}" for _ in range(endpoints)]
    await server.start()
    pool = AgentPool(None)
    registry = NodeRegistry(pool, on_change, pull_deadline=60, **kwargs)
    try:
        yield registry, addresses
    finally:
        await registry.close()
        await pool.close()
        await server.stop(None)


async def wait_until(check: Callable[[], Any], what: str, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
