"""An agent's endpoint changes while its old process still serves a pull (a DaemonSet
surge, a Lease deleted and re-created): the old channel is closed after a grace, and
grpc.aio then ends the calls still open on it with asyncio.CancelledError, not an
RpcError. Those orders must count as lost with the agent (to be sent again), not stay
in flight for ever (the pair Pulling, the cache Processing, its wave slot held). The
agent here is a stand-in whose pulls never end, reached through the coordinator's own
AgentPool over real grpc.aio channels."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator import nodes
from coordinator.images import ImageKey
from coordinator.model import AGENT_UNAVAILABLE, AgentInfo, Inventory, OrderPhase
from coordinator.pairs import PullItem
from protos.fledged.agent.v1 import agent_pb2
from tests.unit.standin import EmptyNodeAgent, registry_over, wait_until

IMAGE = "r.io/slow:1"


class _SlowAgent(EmptyNodeAgent):
    async def PullImages(self, request: Any, context: Any) -> Any:
        yield agent_pb2.PullEvent(image=request.images[0].image, phase=agent_pb2.PHASE_PULLING)
        await asyncio.sleep(3600)


async def test_a_pull_cut_by_our_own_channel_close_is_lost_not_in_flight_for_ever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(nodes, "CHANNEL_CLOSE_GRACE", 0.2)
    async with registry_over(_SlowAgent(), endpoints=2) as (registry, (old, new)):  # type: ignore[abstract]
        registry.set_agent("n1", AgentInfo("n1", old, False, expires=1e12, acquired="a"))
        obs = registry.observation("n1")
        obs.listed(Inventory([], 0), True)
        key = ImageKey(IMAGE)
        registry.submit_pulls(
            {"n1": [PullItem(IMAGE, False, True, caches=("ns/c",))]}, lambda i: []
        )
        await wait_until(lambda: obs.pulls[key].phase is OrderPhase.PULLING, "the pull to start")
        # The same node's agent is now reached at another address: the old channel goes.
        registry.set_agent("n1", AgentInfo("n1", new, False, expires=1e12, acquired="a"))
        await wait_until(lambda: not obs.pulls[key].in_flight, "the cut pull to end", seconds=5)
        record = obs.pulls[key]
        assert record.phase is OrderPhase.FAILED
        assert record.category == AGENT_UNAVAILABLE
        assert old in record.message


class _ShortAgent(_SlowAgent):
    """Answers the first image of a batch and ends the stream, the rest unanswered."""

    async def PullImages(self, request: Any, context: Any) -> Any:
        first = request.images[0].image
        yield agent_pb2.PullEvent(image=first, phase=agent_pb2.PHASE_SUCCEEDED, image_id="sha256:1")


async def test_a_stream_that_ends_with_orders_unanswered_leaves_none_in_flight() -> None:
    """Only a broken stream marked its unanswered orders lost: one that ended cleanly
    but short left them in flight for good (the pair Pulling, its wave slot held, the
    node settling so its unwanted pins were never lifted)."""
    async with registry_over(_ShortAgent()) as (registry, (endpoint,)):  # type: ignore[abstract]
        registry.set_agent("n1", AgentInfo("n1", endpoint, False, expires=1e12, acquired="a"))
        obs = registry.observation("n1")
        obs.listed(Inventory([], 0), True)
        items = [PullItem(i, False, True, caches=("ns/c",)) for i in (IMAGE, "r.io/other:1")]
        registry.submit_pulls({"n1": items}, lambda i: [])
        await wait_until(lambda: not any(r.in_flight for r in obs.pulls.values()), "answers")
        assert obs.pulls[ImageKey(IMAGE)].phase is OrderPhase.DONE
        unanswered = obs.pulls[ImageKey("r.io/other:1")]
        assert (unanswered.phase, unanswered.category) == (OrderPhase.FAILED, AGENT_UNAVAILABLE)
        assert "without answering" in unanswered.message
        assert obs.slots.pulling == {}  # no wave slot held
