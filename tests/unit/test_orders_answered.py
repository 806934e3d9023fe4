"""The last answer to a cache's pull orders is reported at once, whether the streams end
well or break; and a cheap cache is replanned soon after an answer, a costly one not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from coordinator.controller import NODE_CHANGE_BATCH, replan_delay
from coordinator.images import ImageKey
from coordinator.model import AgentInfo, Inventory
from coordinator.nodes import NodeRegistry
from coordinator.pairs import PullItem
from protos.fledged.agent.v1 import agent_pb2


class Broken(grpc.RpcError):
    def details(self) -> str:
        return "connection reset"


class FakeClient:
    """An agent that answers every image of a batch, or breaks after the first."""

    def __init__(self, gate: asyncio.Event, breaks: bool) -> None:
        self.gate = gate
        self.breaks = breaks

    async def pull(self, node: str, request: bytes, limit: float) -> AsyncIterator[Any]:
        batch = agent_pb2.PullImagesRequest.FromString(request)
        for i, order in enumerate(batch.images):
            await self.gate.wait()
            if self.breaks and i == 1:
                raise Broken()
            yield agent_pb2.PullEvent(image=order.image, phase=agent_pb2.PHASE_SUCCEEDED)

    async def list_images(self, node: str) -> agent_pb2.ListImagesResponse:
        return agent_pb2.ListImagesResponse()


class FakePool:
    def __init__(self, clients: dict[str, FakeClient]) -> None:
        self.clients = clients

    def get(self, endpoint: str) -> FakeClient:
        return self.clients[endpoint]

    def __len__(self) -> int:
        return len(self.clients)


async def test_the_last_answer_to_a_caches_orders_is_reported_once() -> None:
    gate = asyncio.Event()
    pool = FakePool({"a:1": FakeClient(gate, breaks=False), "b:1": FakeClient(gate, breaks=True)})
    answered: list[str] = []
    registry = NodeRegistry(
        pool,  # type: ignore[arg-type]
        lambda node, delay: None,
        pull_deadline=60,
        on_answered=answered.append,
    )
    for node, endpoint in (("n1", "a:1"), ("n2", "b:1")):
        obs = registry.observation(node)
        obs.set_agent(AgentInfo(node, endpoint, False, expires=1e12), 0)
        obs.listed(Inventory([], 0), True)
    items = [
        PullItem("r.io/a:1", False, True, caches=("ns/cache",)),
        PullItem("r.io/b:1", False, True, caches=("ns/cache",)),
    ]
    registry.submit_pulls({"n1": items, "n2": items}, lambda image: [])
    await asyncio.sleep(0.05)
    assert answered == []  # nothing answered yet
    gate.set()
    for _ in range(100):
        if answered:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert answered == ["ns/cache"]  # once, after n1's two answers and n2's broken stream
    assert registry.observations["n2"].pulls[ImageKey("r.io/b:1")].category == "AgentUnavailable"


def test_a_cheap_cache_is_replanned_soon_and_a_costly_one_once_a_status_interval() -> None:
    assert replan_delay(0.001, 1.0) < 0.05  # a small cache: 20 ms after an answer
    assert replan_delay(0.010, 1.0) <= NODE_CHANGE_BATCH
    assert replan_delay(0.05, 1.0) == 1.0  # thousands of nodes: no more than its status
    assert replan_delay(0.8, 1.0) == 1.6


async def test_a_batch_behind_a_running_one_is_given_time_for_both() -> None:
    """The agent times each pull from its start; a batch queued there behind another
    waits for it first, so its stream must not be cut at its own pulls' deadline."""
    limits: list[float] = []

    class Recording(FakeClient):
        def pull(self, node: str, request: bytes, limit: float) -> AsyncIterator[Any]:
            limits.append(limit)
            return super().pull(node, request, limit)

    gate = asyncio.Event()  # never set: every pull stays running
    registry = NodeRegistry(
        FakePool({"a:1": Recording(gate, breaks=False)}),  # type: ignore[arg-type]
        lambda node, delay: None,
        pull_deadline=100,
    )
    obs = registry.observation("n1")
    obs.set_agent(AgentInfo("n1", "a:1", False, expires=1e12), 0)
    obs.listed(Inventory([], 0), True)
    long = [PullItem(f"r.io/big-{i}:1", False, True) for i in range(10)]
    registry.submit_pulls({"n1": long}, lambda image: [])
    await asyncio.sleep(0.02)
    registry.submit_pulls({"n1": [PullItem("r.io/small:1", False, True)]}, lambda image: [])
    await asyncio.sleep(0.02)
    assert limits[0] == 100 * 10 + 60
    assert limits[1] == 100 * 11 + 60  # its one pull may start only after the ten
    await registry.close()
