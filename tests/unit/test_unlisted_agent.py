"""An agent alive by its Lease that cannot be listed (a network policy on its port, a
TLS handshake that fails): its nodes' pairs said "listing the node's images" for good,
so every cache selecting the node stayed Processing with no reason shown. After two
failed listings in a row they say why. And listings that hang are not piled up by the
periodic resync. Reached through the coordinator's own AgentPool over real grpc.aio
channels to stand-in agents that refuse, or never answer, listings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from coordinator.api import CacheList
from coordinator.desired import Desired
from coordinator.model import AgentInfo, Inventory
from coordinator.pairs import PairPhase
from coordinator.plan import Settings, plan_node
from protos.fledged.agent.v1 import agent_pb2, agent_pb2_grpc
from tests.unit.standin import registry_over
from tests.unit.test_plan import view


class _Refusing(agent_pb2_grpc.AgentServicer):
    async def ListImages(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "blocked by policy")

    async def GetNodeInfo(self, request: Any, context: Any) -> Any:
        return agent_pb2.NodeInfo()


async def test_an_agent_that_cannot_be_listed_is_named_in_the_pairs() -> None:
    told: list[str] = []
    desired = Desired()
    desired.set_node("n1", {})
    desired.set_cache(view(CacheList(("reg.io/a:1",), ())))

    def changed(node: str, delay: float) -> None:
        told.append(node)

    async with registry_over(_Refusing(), on_change=changed) as (registry, (endpoint,)):  # type: ignore[abstract]
        agent = AgentInfo("n1", endpoint, False, expires=1e12, acquired="a")
        registry.set_agent("n1", agent)  # lists it
        obs = registry.observation("n1")
        assert await registry.first_listings(5) == 0
        first = plan_node("n1", desired.node("n1"), obs, Settings(), 1e9)
        assert [p.phase for p in first.pairs.values()] == [PairPhase.PENDING]  # once: a blip
        told.clear()
        assert not await registry.sync("n1")
        assert told == ["n1"]  # planned again: its pairs have news
        second = plan_node("n1", desired.node("n1"), obs, Settings(), 1e9)
        (pair,) = second.pairs.values()
        assert (pair.phase, pair.reason) == (PairPhase.AGENT_UNAVAILABLE, "AgentUnavailable")
        assert endpoint in pair.message
        assert "blocked by policy" in pair.message
        # a renewal does not list again while the failed listing's retry is set
        listings = len(registry._listing)
        registry.set_agent("n1", AgentInfo("n1", endpoint, False, expires=2e12, acquired="a"))
        assert len(registry._listing) == listings


class _Hanging(agent_pb2_grpc.AgentServicer):
    """Listings hang (a containerd that does not answer), up to the client's limit."""

    async def ListImages(self, request: Any, context: Any) -> Any:
        await asyncio.sleep(3600)

    async def GetNodeInfo(self, request: Any, context: Any) -> Any:
        return agent_pb2.NodeInfo()


async def test_slow_listings_are_not_piled_up_by_the_periodic_resync() -> None:
    """The housekeeping asks every second which nodes are due a resync; a node whose
    listing was still waiting or running was due again, and got another listing task
    each second (at 5,000 nodes with slow agents, thousands of tasks a second)."""
    async with registry_over(_Hanging(), resync_every=1) as (registry, (endpoint,)):  # type: ignore[abstract]
        for i in range(3):
            node = f"n{i}"
            registry.set_agent(node, AgentInfo(node, endpoint, False, expires=1e12, acquired="a"))
            registry.observation(node).listed(Inventory([], 0), True)  # listed long ago
        await asyncio.sleep(0.1)  # the listings set_agent started hang
        for _ in range(5):  # five housekeeping rounds
            for node in registry.resync_due(time.time()):
                registry.resync(node)
            await asyncio.sleep(0.01)
        running = [t for t in registry._listing if not t.done()]
        assert len(running) == 3  # one per node: the first ones, still hanging
