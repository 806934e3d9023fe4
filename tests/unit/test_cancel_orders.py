"""Cancelling pulls no cache wants, from the coordinator's side: the CANCELLED answer
ends the order (no failure, no backoff), and an agent that predates CancelPulls (a
rolling upgrade) is not asked again. Reached through the coordinator's own AgentPool
over real grpc.aio channels to stand-in agents; the real agent's side is proven against
containerd and Docker in tests/agent, and the whole path in tests/coordinator."""

from __future__ import annotations

import asyncio
from typing import Any

from coordinator.images import ImageKey
from coordinator.model import AgentInfo, OrderPhase
from coordinator.pairs import PullItem
from protos.fledged.agent.v1 import agent_pb2, agent_pb2_grpc
from tests.unit.standin import EmptyNodeAgent, registry_over, wait_until

A = ImageKey("reg.io/app/a:v1")


class _Cancelling(EmptyNodeAgent):
    """Pulls that run until cancelled."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.cancelled: list[str] = []

    async def PullImages(self, request: Any, context: Any) -> Any:
        for pull in request.images:
            yield agent_pb2.PullEvent(image=pull.image, phase=agent_pb2.PHASE_PULLING)
        await self.stop.wait()
        for pull in request.images:
            yield agent_pb2.PullEvent(image=pull.image, phase=agent_pb2.PHASE_CANCELLED)

    async def CancelPulls(self, request: Any, context: Any) -> Any:
        self.cancelled.extend(request.images)
        self.stop.set()
        results = [agent_pb2.CancelResult(image=i, was_running=True) for i in request.images]
        return agent_pb2.CancelPullsResponse(results=results)


class _Older(_Cancelling):
    """An agent from before CancelPulls: gRPC answers UNIMPLEMENTED."""

    CancelPulls = agent_pb2_grpc.AgentServicer.CancelPulls  # type: ignore[assignment]


async def test_a_cancelled_pull_ends_its_order_without_a_failure() -> None:
    answered: list[str] = []
    servicer = _Cancelling()  # type: ignore[abstract]
    async with registry_over(servicer, on_answered=answered.append) as (registry, (endpoint,)):
        registry.set_agent("n1", AgentInfo("n1", endpoint, False, expires=1e12, acquired="a"))
        assert await registry.first_listings(5) == 0
        obs = registry.observation("n1")
        registry.submit_pulls({"n1": [PullItem(A, False, True, caches=("ns/c",))]}, lambda i: ())
        await wait_until(
            lambda: A in obs.pulls and obs.pulls[A].phase is OrderPhase.PULLING, "the pull"
        )
        registry.submit_cancels("n1", [A])
        await wait_until(lambda: A not in obs.pulls, "the cancel")
        assert servicer.cancelled == [A]
        assert answered == ["ns/c"]  # the cache's open order is counted off
        assert not obs.slots.pulling.get(A)
        assert not obs.cancel_unsupported


async def test_an_agent_without_cancel_pulls_is_not_asked_again() -> None:
    servicer = _Older()  # type: ignore[abstract]
    async with registry_over(servicer) as (registry, (endpoint,)):
        registry.set_agent("n1", AgentInfo("n1", endpoint, False, expires=1e12, acquired="a"))
        assert await registry.first_listings(5) == 0
        obs = registry.observation("n1")
        registry.submit_pulls({"n1": [PullItem(A, False, True)]}, lambda i: ())
        registry.submit_cancels("n1", [A])
        await wait_until(lambda: obs.cancel_unsupported, "the refusal")
        assert obs.pulls[A].in_flight  # it runs to its end, as before CancelPulls
        servicer.stop.set()
