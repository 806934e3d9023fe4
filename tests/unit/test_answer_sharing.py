"""Every node of a fleet answers a pull with the same digest and sizes; each answer's
strings and ints are new objects, and a pull record keeps them for as long as the
cache lives (5,000 nodes x 20 images: ~17 MiB of copies). Answers must share them."""

from __future__ import annotations

from coordinator.images import image_key
from coordinator.model import Inventory, NodeObservation, OrderPhase
from coordinator.nodes import pulled_from
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
