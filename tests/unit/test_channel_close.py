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

import grpc
import pytest

from common.wire import NODE_HEADER
from coordinator import nodes
from coordinator.agents import AgentPool
from coordinator.images import ImageKey
from coordinator.model import AGENT_UNAVAILABLE, AgentInfo, Inventory, NodeObservation, OrderPhase
from coordinator.pairs import PullItem
from protos.fledged.agent.v1 import agent_pb2
from tests.unit.standin import EmptyNodeAgent, registry_over, wait_until

IMAGE = "r.io/slow:1"


class _SlowAgent(EmptyNodeAgent):
    async def PullImages(self, request: Any, context: Any) -> Any:
        yield agent_pb2.PullEvent(image=request.images[0].image, phase=agent_pb2.PHASE_PULLING)
        await asyncio.sleep(3600)


def _pull_ordered(registry: nodes.NodeRegistry, endpoint: str) -> tuple[NodeObservation, ImageKey]:
    """Node n1, listed, with its agent at `endpoint`, ordered to pull IMAGE."""
    registry.set_agent("n1", AgentInfo("n1", endpoint, False, expires=1e12, acquired="a"))
    obs = registry.observation("n1")
    obs.listed(Inventory([], 0), True)
    registry.submit_pulls({"n1": [PullItem(IMAGE, False, True, caches=("ns/c",))]}, lambda i: [])
    return obs, ImageKey(IMAGE)


async def test_a_pull_cut_by_our_own_channel_close_is_lost_not_in_flight_for_ever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(nodes, "CHANNEL_CLOSE_GRACE", 0.2)
    async with registry_over(_SlowAgent(), endpoints=2) as (registry, (old, new)):  # type: ignore[abstract]
        obs, key = _pull_ordered(registry, old)
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


def assert_nothing_warned(caplog: pytest.LogCaptureFixture) -> None:
    """A listing that ended because its agent moved or its node went is no failure."""
    failed = [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    assert not failed, failed


class _HeldListing(EmptyNodeAgent):
    """Node n0's listing lasts until released: listings behind it wait their turn."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def ListImages(self, request: Any, context: Any) -> Any:
        if dict(context.invocation_metadata()).get(NODE_HEADER) == "n0":
            await self.release.wait()
        return agent_pb2.ListImagesResponse()


async def test_a_listing_whose_agent_moved_while_it_waited_is_dropped_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A listing waits its turn (LISTINGS_AT_ONCE) while its agent restarts at another
    address (every agent does in a DaemonSet rollout): the old channel is closed by
    then, and grpc.aio refuses a call on it with a UsageError, which was no RpcError:
    the coordinator logged an ERROR with its traceback for the node. The new agent's
    own listing is the one that counts."""
    monkeypatch.setattr(nodes, "LISTINGS_AT_ONCE", 1)
    monkeypatch.setattr(nodes, "CHANNEL_CLOSE_GRACE", 0.2)
    agent = _HeldListing()  # type: ignore[abstract]
    async with registry_over(agent, endpoints=3) as (registry, (busy, old, new)):
        registry.set_agent("n0", AgentInfo("n0", busy, False, expires=1e12, acquired="a"))
        registry.set_agent("n1", AgentInfo("n1", old, False, expires=1e12, acquired="a"))
        await asyncio.sleep(0.1)  # n1's listing waits behind n0's
        registry.set_agent("n1", AgentInfo("n1", new, False, expires=1e12, acquired="b"))
        await asyncio.sleep(0.5)  # the old channel is closed
        agent.release.set()
        obs = registry.observation("n1")
        await wait_until(lambda: obs.inventory is not None, "n1 listed through its new agent")
        await wait_until(lambda: not registry._tasks, "the listings to end")
    assert_nothing_warned(caplog)


class _HeldInfo(EmptyNodeAgent):
    """The first GetNodeInfo lasts until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = asyncio.Event()

    async def GetNodeInfo(self, request: Any, context: Any) -> Any:
        if not self.held.is_set():
            self.held.set()
            await self.release.wait()
        return agent_pb2.NodeInfo()


async def test_a_listing_whose_agent_moved_between_its_calls_is_dropped_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent moves between a listing's two calls: the second one, on the closed
    channel, fails as an agent out of reach (not grpc.aio's UsageError), and as the
    agent moved it is no listing failure of the node (no warning, no retry)."""
    monkeypatch.setattr(nodes, "CHANNEL_CLOSE_GRACE", 5.0)
    agent = _HeldInfo()  # type: ignore[abstract]
    async with registry_over(agent, endpoints=2) as (registry, (old, new)):
        registry.set_agent("n1", AgentInfo("n1", old, False, expires=1e12, acquired="a"))
        await asyncio.wait_for(agent.held.wait(), 5)
        registry.set_agent("n1", AgentInfo("n1", new, False, expires=1e12, acquired="b"))
        await asyncio.sleep(0.1)  # the old channel closes, its call still running
        agent.release.set()
        obs = registry.observation("n1")
        await wait_until(lambda: obs.inventory is not None, "n1 listed through its new agent")
        await wait_until(lambda: not registry._tasks, "the listings to end")
        assert not registry._relists
    assert_nothing_warned(caplog)


async def test_a_listing_of_a_node_forgotten_between_its_calls_is_dropped_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent's Lease with no Node behind it (a Node deleted while its agent still
    runs): the node's plan forgets it, which closes its channel, between the calls of
    the listing its Lease started. That listing warned 'cannot list images ... the
    channel was closed' and set a retry, which the next renewal's listing met again:
    a warning every few seconds for as long as the Lease was renewed."""
    monkeypatch.setattr(nodes, "CHANNEL_CLOSE_GRACE", 5.0)
    agent = _HeldInfo()  # type: ignore[abstract]
    async with registry_over(agent) as (registry, (endpoint,)):
        registry.set_agent("n1", AgentInfo("n1", endpoint, False, expires=1e12, acquired="a"))
        await asyncio.wait_for(agent.held.wait(), 5)
        registry.forget_node("n1")
        await asyncio.sleep(0.1)  # its channel closes, the call still running
        agent.release.set()
        await wait_until(lambda: not registry._tasks, "the listing to end")
        assert not registry._relists
        assert "n1" not in registry.observations
    assert_nothing_warned(caplog)


async def test_a_call_on_a_closed_channel_fails_as_an_agent_out_of_reach() -> None:
    client = AgentPool(None).get("127.0.0.1:9")
    await client.close(1.0)
    with pytest.raises(grpc.RpcError) as listing:
        await client.list_images("n1")
    assert listing.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1:9" in str(listing.value.details())
    with pytest.raises(grpc.RpcError):
        client.pull("n1", b"", 5.0)


async def test_work_queued_for_an_agent_that_moved_dials_no_channel_to_its_old_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Orders queued, then the agent moves before they go out (the same turn of the
    loop): they go over the channel they were queued for, which closes, and count as
    lost with that agent; no channel is dialled anew to the old address (the pool kept
    that one for good: nothing closes a channel no node uses)."""
    monkeypatch.setattr(nodes, "CHANNEL_CLOSE_GRACE", 0.2)
    async with registry_over(_SlowAgent(), endpoints=2) as (registry, (old, new)):  # type: ignore[abstract]
        obs, key = _pull_ordered(registry, old)
        registry.submit_pins("n1", [("r.io/pinned:1", True)])
        registry.set_agent("n1", AgentInfo("n1", new, False, expires=1e12, acquired="b"))
        await wait_until(lambda: not obs.pulls[key].in_flight, "the order to be lost")
        await wait_until(lambda: not obs.pins_in_flight, "the pin change to end")
        assert obs.pulls[key].category == AGENT_UNAVAILABLE
        assert old not in registry._pool._clients
