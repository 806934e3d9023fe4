"""Every node of a fleet answers a pull with the same digest and sizes; each answer's
strings and ints are new objects, and a pull record keeps them for as long as the
cache lives (5,000 nodes x 20 images: ~17 MiB of copies). Answers must share them,
and so must the records and the inventories made of them."""

from __future__ import annotations

import itertools

from coordinator.api import CacheList, CacheSpec
from coordinator.desired import CacheView, Desired
from coordinator.images import image_key
from coordinator.model import (
    AgentInfo,
    Inventory,
    NodeObservation,
    OrderPhase,
    names,
    shared_image,
)
from coordinator.nodes import pulled_from
from coordinator.pairs import PairPhase
from coordinator.plan import Settings, plan_node
from coordinator.refresh import Refreshes
from protos.fledged.agent.v1 import agent_pb2

IMAGE = "reg.io/app:v1"
DIGEST = "sha256:" + "b" * 64
SIZE = 123_456_789


def answer() -> agent_pb2.PullEvent:
    """A fresh message each time, as each node's stream delivers it."""
    return agent_pb2.PullEvent(
        image=IMAGE,
        image_id="sha256:" + "a" * 64,
        repo_digest=DIGEST,
        size=SIZE,
        bytes_done=SIZE,
        bytes_total=SIZE,
        phase=agent_pb2.PHASE_SUCCEEDED,
    )


def test_the_fleets_answers_share_one_digest_and_one_size() -> None:
    key = image_key(IMAGE)
    records = []
    for _ in range(50):
        obs = NodeObservation(inventory=Inventory([], 0.0))
        obs.pull_succeeded(key, pulled_from(answer()), 1.0)
        records.append(obs.pulls[key])
    first = records[0]
    assert first.phase is OrderPhase.DONE
    assert (first.digest, first.bytes_done, first.bytes_total) == (DIGEST, SIZE, SIZE)
    assert all(r.digest is first.digest for r in records)
    assert all(r.bytes_done is first.bytes_done for r in records)
    assert all(r.bytes_total is first.bytes_total for r in records)


def test_the_fleets_successes_are_one_record_dated_by_the_latest_refresh() -> None:
    """A success's date is only compared with refresh starts: dated by the latest
    start, answers alike are one record, and still read as before or after a refresh."""
    key = image_key(IMAGE)
    refreshes = Refreshes()
    records = []
    for answered in (10.0, 11.0, 12.0):  # three nodes, each answering at its own time
        obs = NodeObservation(inventory=Inventory([], 0.0))
        obs.pull_succeeded(key, pulled_from(answer()), refreshes.date(answered))
        records.append(obs.pulls[key])
    assert all(r is records[0] for r in records)
    refreshes.timer(["ns/cache"], 20.0)  # a refresh begins after those answers
    since = refreshes.since("ns/cache")
    assert since is not None
    assert records[0].finished < since
    obs = NodeObservation(inventory=Inventory([], 0.0))
    obs.pull_succeeded(key, pulled_from(answer()), refreshes.date(21.0))  # after it
    assert obs.pulls[key].finished >= since


def test_nodes_holding_the_same_images_share_their_maps() -> None:
    """Each answer makes a node a new inventory; nodes answering alike, in any order,
    end with one set of maps between them."""
    images = [
        shared_image(f"sha256:{c * 64}", names([f"reg.io/app-{c}:v1"]), frozenset(), True, True, 1)
        for c in "abc"
    ]
    inventories = []
    for order in itertools.permutations(images):
        inventory = Inventory([], 0.0)
        for image in order:
            inventory = inventory.replace(image)
        inventories.append(inventory)
    inventories.append(Inventory(images, 5.0))  # a listing of the same images
    first = inventories[0]
    assert all(i._held is first._held for i in inventories)
    assert all(i.lookup(image_key("reg.io/app-b:v1")) is images[1] for i in inventories)


def test_nodes_in_the_same_state_share_their_planned_maps() -> None:
    """A fleet-wide order puts thousands of nodes in a handful of states: their plans'
    pairs and bases are one map per state, not two per node."""
    desired = Desired()
    nodes = [f"n{i}" for i in range(4)]
    for node in nodes:
        desired.set_node(node, {"zone": "a"})
    spec = CacheSpec((CacheList(("reg.io/app:v1", "reg.io/other:v2"), (), True),), ())
    desired.set_cache(CacheView(key="ns/c", generation=1, spec=spec))
    held = shared_image("sha256:" + "c" * 64, names(["reg.io/app:v1"]), frozenset(), True, True, 1)
    results = []
    for node in nodes:
        obs = NodeObservation(
            agent=AgentInfo(node, "127.0.0.1:1", False, 2_000.0),
            inventory=Inventory([held], 0.0),
        )
        results.append(plan_node(node, desired.node(node), obs, Settings(), 1_000.0))
    first = results[0]
    assert first.pairs[image_key("reg.io/app:v1")].phase is PairPhase.READY
    assert len(first.pairs) == 2
    assert all(r.pairs is first.pairs and r.basis is first.basis for r in results)
