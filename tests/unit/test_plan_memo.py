"""The planner's memo must never change a plan: a cache replanned node by node gives
the same pairs, orders and status as one planned from scratch, whatever happened in
between. Checked over random histories of the events the node registry records."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from common.reference import ImageRef, parse
from coordinator.api import CacheList, CacheSpec
from coordinator.model import (
    AgentInfo,
    Inventory,
    NodeObservation,
    OrderPhase,
    PullRecord,
)
from coordinator.nodes import NodeRegistry, renewed
from coordinator.pairs import NodePlan, PairPhase, PairState, Tally
from coordinator.plan import CacheView, Plan, PlanMemo, Settings, plan_cache
from coordinator.status import build_status
from protos.fledged.agent.v1 import agent_pb2 as A

NOW = "2026-11-24T00:00:00Z"
IMAGES = ["r.io/a:1", "r.io/b:1", "r.io/c@sha256:" + "c" * 64, "r.io/d:2", "r.io/a:2"]
LISTS = (
    CacheList(tuple(IMAGES[:2]), ()),
    CacheList(tuple(IMAGES[1:]), (("zone", "a"),), pin=False),
)


def nobody(node: str, ref: ImageRef) -> tuple[bool, bool]:
    return False, False


def somebody(node: str, ref: ImageRef) -> tuple[bool, bool]:
    return True, node.endswith("1")


class World:
    """Nodes, their observations and the clock, changed as the registry changes them."""

    def __init__(self, rng: random.Random, nodes: int) -> None:
        self.rng = rng
        self.now = time.time()  # answers are stamped with the real clock, as in the registry
        self.labels = {f"n{i}": {"zone": rng.choice("ab")} for i in range(nodes)}
        self.obs = {n: self._fresh_obs() for n in self.labels}
        self.others = (nobody, 0)

    def _fresh_obs(self) -> NodeObservation:
        return NodeObservation(
            agent=AgentInfo("n", "127.0.0.1:1", False, self.now + self.rng.choice([5, 50, 500])),
            inventory=Inventory([], self.now) if self.rng.random() < 0.9 else None,
        )

    def dispatch(self, plan: Plan) -> None:
        for node, items in plan.pulls.items():
            obs = self.obs[node]
            obs.touch(*(parse(item.image).canonical for item in items))  # as the registry does
            for item in items:
                key = parse(item.image).canonical
                old = obs.pulls.get(key)
                obs.pulls[key] = PullRecord(
                    OrderPhase.SENT, self.now, failures=old.failures if old else 0
                )
        for node, changes in plan.pins.items():
            obs = self.obs[node]
            obs.touch()
            assert obs.inventory is not None
            for image, pinned in changes:
                held = obs.inventory.lookup(parse(image))
                if held is not None:
                    obs.inventory = obs.inventory.replace(
                        replace(held, pinned=pinned, pin_owned=pinned)
                    )

    def step(self) -> None:
        """One thing happening somewhere in the fleet."""
        rng = self.rng
        node = rng.choice(sorted(self.obs))
        obs = self.obs[node]
        flying = [k for k, r in obs.pulls.items() if r.in_flight]
        what = rng.random()
        if what < 0.35 and flying:  # an agent's answer, recorded by the registry's own code
            key = rng.choice(flying)
            ref = parse(key)
            roll = rng.random()
            if roll < 0.3:
                event = A.PullEvent(
                    image=key, phase=A.PHASE_PULLING, bytes_done=rng.randrange(100), bytes_total=100
                )
            elif roll < 0.8:
                event = A.PullEvent(
                    image=key,
                    phase=A.PHASE_SUCCEEDED,
                    image_id="id-" + rng.choice([ref.name, key]),  # two tags, one image
                    repo_digest=ref.digest or "sha256:" + rng.choice("12") * 64,
                    pin=rng.choice([A.PIN_STATE_PINNED, A.PIN_STATE_UNPINNED]),
                )
            else:
                event = A.PullEvent(
                    image=key,
                    phase=A.PHASE_FAILED,
                    error_category=rng.choice(
                        [A.ERROR_CATEGORY_REGISTRY_UNAVAILABLE, A.ERROR_CATEGORY_NOT_FOUND]
                    ),
                    error_message="no",
                )
            NodeRegistry._apply_event(obs, key, event)
        elif what < 0.45 and obs.inventory is not None and obs.inventory.images:
            gone = rng.choice(obs.inventory.images)  # the kubelet collected an image
            obs.inventory = Inventory(
                [i for i in obs.inventory.images if i is not gone], obs.inventory.synced_at
            )
            obs.touch()
        elif what < 0.55:
            self.now += rng.choice([1, 10, 40, 400])  # leases run out, retries fall due
        elif what < 0.62 and obs.agent is not None:  # a Lease renewed, as the registry sees it
            old, obs.agent = obs.agent, replace(obs.agent, expires=self.now + rng.choice([5, 500]))
            if not renewed(old, obs.agent, self.now):
                obs.touch()
        elif what < 0.67:
            self.labels[node] = {"zone": rng.choice("abc")}
        elif what < 0.70:
            self.obs[node] = self._fresh_obs()  # a new agent process
        elif what < 0.73:
            if node in self.labels and len(self.labels) > 2:
                del self.labels[node]  # the Node object was deleted
            else:
                self.labels[node] = {"zone": "a"}
        elif what < 0.76:
            fn = somebody if self.others[0] is nobody else nobody
            self.others = (fn, self.others[1] + 1)
        elif what < 0.80 and obs.inventory is None:
            obs.inventory = Inventory([], self.now)
            obs.touch()


def _status(view: CacheView, plan: Plan) -> dict[str, object]:
    status = build_status(view, plan, {"observedGeneration": 1, "startTime": NOW}, NOW)
    return {k: v for k, v in status.items() if k != "conditions"}


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("wave", [None, 2])
def test_a_memo_plans_exactly_what_planning_from_scratch_plans(seed: int, wave: int | None) -> None:
    rng = random.Random(seed)
    world = World(rng, nodes=12)
    memo = PlanMemo()
    settings = Settings(wave=wave, retry_base=20, retry_max=60)
    reused = kept_pairs = 0
    for round_ in range(300):
        spec = CacheSpec(LISTS if round_ < 200 else LISTS[:1], ())
        view = CacheView(key="ns/c", generation=1 if round_ < 200 else 2, spec=spec)
        in_flight: dict[str, int] = {}
        for obs in world.obs.values():
            for key, record in obs.pulls.items():
                in_flight[key] = in_flight.get(key, 0) + record.in_flight
        others, token = world.others
        args = (view, world.labels, world.obs, others, in_flight, settings, world.now)
        before = dict(memo.tally.nodes)
        remembered = plan_cache(*args, memo=memo, others_token=token)
        fresh = plan_cache(*args)
        for n, old in before.items():
            new = remembered.tally.nodes.get(n)
            if new is old:
                reused += 1
            elif new is not None and len(new.pairs) == len(old.pairs):
                kept_pairs += sum(a is b for a, b in zip(old.pairs, new.pairs, strict=True))
        assert remembered.pairs == fresh.pairs
        assert dict(remembered.pulls) == dict(fresh.pulls)
        assert dict(remembered.pins) == dict(fresh.pins)
        assert remembered.settled == fresh.settled
        assert remembered.next_retry == fresh.next_retry
        assert _status(view, remembered) == _status(view, fresh)
        world.dispatch(remembered)
        for _ in range(rng.randrange(1, 4)):
            world.step()
    # The memo did keep whole nodes and single pairs, or this test proves nothing.
    assert reused > 0
    assert kept_pairs > 0 or wave is not None  # a wave replans nodes waiting for a slot


def test_a_tally_returns_to_empty_when_every_node_leaves() -> None:
    tally = Tally()
    pairs = [
        PairState("n1", "a", PairPhase.READY, digest="sha256:1"),
        PairState("n1", "b", PairPhase.PULLING, bytes_done=3, bytes_total=9),
        PairState("n2", "a", PairPhase.FAILED, "NotFound", "x", retry_at=5.0),
        PairState("n2", "b", PairPhase.AGENT_UNAVAILABLE, "AgentUnavailable"),
    ]
    tally.put("n1", NodePlan.of(pairs[:2]))
    tally.put("n2", NodePlan.of(pairs[2:]))
    assert (tally.pairs, tally.ready, tally.open, tally.next_retry) == (4, 1, 1, 5.0)
    assert tally.images["a"].digests == {"sha256:1": 1}
    assert sorted(tally.failed) == ["a", "b"]
    tally.put("n1", NodePlan.of([replace(pairs[1], phase=PairPhase.READY), pairs[0]]))
    assert (tally.ready, tally.open, tally.images["b"].pulling) == (2, 0, 0)
    for node in ("n1", "n2"):
        tally.put(node, None)
    assert (tally.pairs, tally.ready, tally.open) == (0, 0, 0)
    assert (tally.nodes, tally.images, tally.behind, tally.failed, tally.retries) == ({},) * 5
