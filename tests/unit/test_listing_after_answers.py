"""A node whose pulls were answered is settled again (its unwanted pins may be lifted)
only by a listing: one taken while the agent's Lease is renewed must still count, one
taken while an answer came in must not hide it, and a failed one is tried again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from coordinator.images import image_key
from coordinator.model import AgentInfo, Inventory
from coordinator.nodes import NodeRegistry
from coordinator.pairs import PullItem
from protos.fledged.agent.v1 import agent_pb2

IMAGE = "r.io/a:1"
IMAGE_ID = "sha256:" + "a" * 64


def _succeeded() -> agent_pb2.PullEvent:
    return agent_pb2.PullEvent(
        image=IMAGE,
        phase=agent_pb2.PHASE_SUCCEEDED,
        image_id=IMAGE_ID,
        pin=agent_pb2.PIN_STATE_PINNED,
    )


def _listing(tags: list[str]) -> agent_pb2.ListImagesResponse:
    """The node holds IMAGE_ID under `tags`, pinned by kube-fledged."""
    image = agent_pb2.ImageInfo(
        id=IMAGE_ID, repo_tags=tags, pin=agent_pb2.PIN_STATE_PINNED, pinned_by_fledged=True
    )
    return agent_pb2.ListImagesResponse(images=[image] if tags else [])


async def _until(condition: Any, what: str, tries: int = 300) -> None:
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


class SlowListing:
    """An agent that answers its one pull, then lists only once `listing` is set."""

    def __init__(self) -> None:
        self.listing = asyncio.Event()
        self.asked = asyncio.Event()

    async def pull(self, node: str, request: bytes, limit: float) -> AsyncIterator[Any]:
        yield _succeeded()

    async def list_images(self, node: str) -> agent_pb2.ListImagesResponse:
        self.asked.set()
        await self.listing.wait()
        return _listing([IMAGE])


class Pool:
    def __init__(self, client: SlowListing) -> None:
        self.client = client

    def get(self, endpoint: str) -> SlowListing:
        return self.client

    def __len__(self) -> int:
        return 1


async def test_a_listing_that_meets_a_lease_renewal_still_settles_the_node() -> None:
    client = SlowListing()
    changes: list[str] = []
    registry = NodeRegistry(
        Pool(client),  # type: ignore[arg-type]
        lambda node, delay: changes.append(node),
        pull_deadline=60,
    )
    agent = AgentInfo("n1", "a:1", False, expires=1e12, acquired="t0")
    registry.set_agent("n1", agent)
    obs = registry.observation("n1")
    obs.listed(Inventory([], 0), True)
    registry.submit_pulls({"n1": [PullItem(IMAGE, False, True, caches=("ns/c",))]}, lambda i: [])
    await asyncio.wait_for(client.asked.wait(), 5)  # answered; the batch's listing is out
    assert obs.settling
    registry.set_agent("n1", AgentInfo("n1", "a:1", False, expires=2e12, acquired="t0"))
    changes.clear()
    client.listing.set()
    # The renewal is the same process: its listing counts.
    await _until(lambda: not obs.settling, "the node to settle", tries=100)
    assert changes == ["n1"]  # ... and the node is planned again with it
    assert obs.inventory is not None
    held = obs.inventory.lookup(image_key(IMAGE))
    assert held is not None
    assert held.pin_owned
    await registry.close()


class Scripted:
    """An agent whose pull answers once `answer` is set and whose listings follow a
    script: each entry is a listing's images, or None for a failed call."""

    def __init__(self, script: list[list[str] | None], answer_while_listing: bool = False):
        self.script = script
        self.answer = asyncio.Event()
        self.answered = asyncio.Event()
        self.end = asyncio.Event()  # the stream ends (and its batch's listing goes out)
        self.end.set()
        self.answer_while_listing = answer_while_listing  # the first listing lets the
        # pull answer, and returns only after the answer is in
        self.listings = 0

    async def pull(self, node: str, request: bytes, limit: float) -> AsyncIterator[Any]:
        await self.answer.wait()
        yield _succeeded()
        self.answered.set()
        await self.end.wait()

    async def node_info(self, node: str) -> agent_pb2.NodeInfo:
        return agent_pb2.NodeInfo(pinning_supported=True)

    async def list_images(self, node: str) -> agent_pb2.ListImagesResponse:
        self.listings += 1
        if self.answer_while_listing and self.listings == 1:
            self.answer.set()  # the pull's answer arrives while this listing is taken
            await self.answered.wait()
        tags = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if tags is None:
            raise Broken()
        return _listing(tags)


class Broken(grpc.RpcError):
    def details(self) -> str:
        return "connection reset"


def _registry(client: Any) -> NodeRegistry:
    registry = NodeRegistry(Pool(client), lambda node, delay: None, pull_deadline=60)  # type: ignore[arg-type]
    obs = registry.observation("n1")
    obs.set_agent(AgentInfo("n1", "a:1", False, expires=1e12, acquired="t0"), 0)
    obs.listed(Inventory([], 0), True)  # listed once already
    return registry


async def test_a_listing_taken_while_an_answer_came_in_is_taken_again() -> None:
    """Taken before the answer, it would drop the image just pulled from what the
    node holds (and the node would be ordered the pull again)."""
    client = Scripted([[], [IMAGE]], answer_while_listing=True)
    client.end.clear()
    registry = _registry(client)
    obs = registry.observation("n1")
    registry.submit_pulls({"n1": [PullItem(IMAGE, False, True, caches=("ns/c",))]}, lambda i: [])
    registry.resync("n1")  # a periodic resync, say, while the pull runs
    assert await registry.first_listings(3) == 0
    assert obs.inventory is not None
    assert obs.inventory.lookup(image_key(IMAGE)) is not None  # not the listing before it
    client.end.set()
    await _until(lambda: not obs.settling, "the node to settle after its batch")
    await registry.close()


async def test_a_failed_listing_after_answers_is_tried_again(monkeypatch: Any) -> None:
    monkeypatch.setattr("coordinator.nodes.RELIST_AFTER", 0.02, raising=False)
    client = Scripted([None, [IMAGE]])
    client.answer.set()
    registry = _registry(client)
    obs = registry.observation("n1")
    registry.submit_pulls({"n1": [PullItem(IMAGE, False, True, caches=("ns/c",))]}, lambda i: [])
    await _until(lambda: client.listings >= 2 and not obs.settling, "a second listing")
    await registry.close()
