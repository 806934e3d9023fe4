"""Plans a set of caches over a set of nodes the way the controller does, node by
node, for tests of the rules: each cache's shares, each node's plan with its orders
counted into the wave slots before the next node is planned (on copies: the
observations given are left as they are), and each cache's projection."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import astuple, dataclass, field
from typing import NamedTuple

from coordinator.api import CacheList
from coordinator.desired import CacheView, Desired, Removal
from coordinator.images import ImageKey, image_key
from coordinator.model import NodeObservation
from coordinator.pairs import PairPhase, PullItem, Tally
from coordinator.plan import NodeResult, Settings, plan_node
from coordinator.projection import CacheProjection
from coordinator.waves import WaveSlots


class NodePair(NamedTuple):
    """A pair with its node, for the rules' tests to read."""

    node: str
    image: str
    phase: PairPhase
    reason: str
    message: str
    bytes_done: int
    bytes_total: int
    digest: str
    pinned: bool
    retry_at: float | None


@dataclass
class Plan:
    """One cache's side of a planning round, and the orders every node got."""

    projection: CacheProjection
    pulls: dict[str, list[PullItem]] = field(default_factory=lambda: defaultdict(list))
    pins: dict[str, list[tuple[str, bool]]] = field(default_factory=lambda: defaultdict(list))
    removals: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    cancels: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    results: dict[str, NodeResult] = field(default_factory=dict)
    unmatched: list[CacheList] = field(default_factory=list)
    removing: tuple[Removal, ...] = ()
    refreshing: bool = False

    @property
    def tally(self) -> Tally:
        return self.projection.tally

    @property
    def pairs(self) -> list[NodePair]:
        return [NodePair(node, *astuple(p)) for node, p in self.tally.all_pairs()]

    @property
    def has_orders(self) -> bool:
        return any(
            any(orders.values()) for orders in (self.pulls, self.pins, self.removals, self.cancels)
        )

    @property
    def settled(self) -> bool:
        return self.projection.settled and not self.has_orders

    @property
    def next_retry(self) -> float | None:
        return self.tally.next_retry

    @property
    def purge_done(self) -> bool:
        return self.projection.purge_done

    @property
    def finalize_done(self) -> bool:
        return self.projection.finalize_done

    @property
    def refresh_done(self) -> bool:
        return self.refreshing and self.settled


def plan_caches(
    caches: list[CacheView],
    nodes: Mapping[str, Mapping[str, str]],
    observations: Mapping[str, NodeObservation],
    settings: Settings,
    now: float,
    in_flight: Mapping[str, int] | None = None,
) -> dict[str, Plan]:
    """Every cache's plan; `in_flight`: pulls of each image under way on other nodes."""
    slots = WaveSlots()
    for image, count in (in_flight or {}).items():
        slots.pulling[image_key(image)] = count
    desired = Desired(settings.wave)
    for node, labels in nodes.items():
        desired.set_node(node, labels)
    plans = {c.key: Plan(CacheProjection()) for c in caches}
    for view in caches:
        for change in desired.set_cache(view):
            plans[view.key].projection.share_changed(change.node, change.share)
    for node in sorted(nodes):
        obs = observations.get(node)
        if obs is not None:
            obs = copy.deepcopy(obs)
            obs.slots = slots
        want = desired.node(node)
        result = plan_node(node, want, obs, settings, now)
        if obs is not None and result.pulls:
            obs.pulls_ordered([image_key(i.image) for i in result.pulls], {})
        for cache, share in want.shares:
            plan = plans[cache]
            plan.projection.put(node, share, result)
            plan.results[node] = result
            if result.pulls:
                plan.pulls[node].extend(result.pulls)
            if result.pins:
                plan.pins[node].extend(result.pins)
            if result.removals:
                plan.removals[node].extend(result.removals)
            if result.cancels:
                plan.cancels[node].extend(result.cancels)
    for view in caches:
        plan = plans[view.key]
        plan.unmatched = desired.unmatched(view.key)
        form = desired.forms[view.key]
        plan.removing = plan.projection.open_removals(form.removals)
        plan.refreshing = view.refresh_since is not None
    return plans


def plan_cache(
    view: CacheView,
    nodes: Mapping[str, Mapping[str, str]],
    observations: Mapping[str, NodeObservation],
    settings: Settings,
    now: float,
    others: list[CacheView] | None = None,
    in_flight: Mapping[str, int] | None = None,
) -> Plan:
    """`view`'s plan, beside `others` (the other caches)."""
    plans = plan_caches([view, *(others or [])], nodes, observations, settings, now, in_flight)
    return plans[view.key]


def key(image: str) -> ImageKey:
    return image_key(image)
