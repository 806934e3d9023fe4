"""A node whose pulls were answered is settled again (its unwanted pins may be lifted)
only by a listing: one taken while the agent's Lease is renewed must still count."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from coordinator.images import image_key
from coordinator.model import AgentInfo, Inventory
from coordinator.nodes import NodeRegistry
from coordinator.pairs import PullItem
from protos.fledged.agent.v1 import agent_pb2

IMAGE = "r.io/a:1"
IMAGE_ID = "sha256:" + "a" * 64


class SlowListing:
    """An agent that answers its one pull, then lists only once `listing` is set."""

    def __init__(self) -> None:
        self.listing = asyncio.Event()
        self.asked = asyncio.Event()

    async def pull(self, node: str, request: bytes, limit: float) -> AsyncIterator[Any]:
        yield agent_pb2.PullEvent(
            image=IMAGE,
            phase=agent_pb2.PHASE_SUCCEEDED,
            image_id=IMAGE_ID,
            pin=agent_pb2.PIN_STATE_PINNED,
        )

    async def list_images(self, node: str) -> agent_pb2.ListImagesResponse:
        self.asked.set()
        await self.listing.wait()
        image = agent_pb2.ImageInfo(
            id=IMAGE_ID,
            repo_tags=[IMAGE],
            pin=agent_pb2.PIN_STATE_PINNED,
            pinned_by_fledged=True,
        )
        return agent_pb2.ListImagesResponse(images=[image])


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
    for _ in range(100):
        if not obs.settling:
            break
        await asyncio.sleep(0.01)
    assert not obs.settling  # the renewal is the same process: its listing counts
    assert changes == ["n1"]  # ... and the node is planned again with it
    assert obs.inventory is not None
    held = obs.inventory.lookup(image_key(IMAGE))
    assert held is not None
    assert held.pin_owned
    await registry.close()
