"""The decision: what one ImageCache wants, what the nodes hold, and the orders that
close the gap. A pure function over plain data, so every rule is unit-tested.

Safe to run any number of times: an order already in flight is never sent again, an
image already present is not pulled again (unless a refresh asks), and images or pins
another cache still wants are never removed or lifted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from common.reference import ImageRef, parse

from .api import CacheList, CacheSpec, Reason
from .model import PERMANENT_CATEGORIES, NodeObservation, OrderPhase

Selector = tuple[tuple[str, str], ...]
# (node, image) -> (another cache wants it on that node, another cache wants it pinned)
OthersWant = Callable[[str, ImageRef], tuple[bool, bool]]


class PairPhase(StrEnum):
    READY = "Ready"
    PENDING = "Pending"  # waiting for the node's inventory or an order slot
    QUEUED = "Queued"  # held back by the wave size
    WAITING = "Waiting"  # queued on the agent
    PULLING = "Pulling"
    FAILED = "Failed"
    AGENT_UNAVAILABLE = "AgentUnavailable"
    REMOVING = "Removing"
    REMOVED = "Removed"


DONE_PHASES = frozenset(
    {PairPhase.READY, PairPhase.FAILED, PairPhase.AGENT_UNAVAILABLE, PairPhase.REMOVED}
)


@dataclass(frozen=True)
class Settings:
    always_pull: bool = False  # --image-pull-policy=Always
    wave: int | None = None  # --max-concurrent-nodes-per-image; None: unlimited
    retry_base: float = 30.0
    retry_max: float = 300.0


@dataclass(frozen=True)
class CacheView:
    key: str
    generation: int
    spec: CacheSpec | None  # None when the spec is invalid
    applied: tuple[CacheList, ...] = ()
    removing: tuple[tuple[str, Selector], ...] = ()
    deleting: bool = False
    purge: bool = False
    purged_generation: int | None = None
    refresh_since: float | None = None

    @property
    def dormant(self) -> bool:
        """Purged at this generation: hold no images until an edit or a refresh."""
        return (
            self.purged_generation == self.generation
            and not self.purge
            and self.refresh_since is None
        )


@dataclass(frozen=True)
class PullItem:
    image: str
    always: bool
    pin: bool


@dataclass(frozen=True)
class PairState:
    node: str
    image: str
    phase: PairPhase
    reason: str = ""
    message: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    digest: str = ""
    pinned: bool = False
    retry_at: float | None = None


@dataclass
class Plan:
    pairs: list[PairState] = field(default_factory=list)
    pulls: dict[str, list[PullItem]] = field(default_factory=lambda: defaultdict(list))
    pins: dict[str, list[tuple[str, bool]]] = field(default_factory=lambda: defaultdict(list))
    removals: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    removing: tuple[tuple[str, Selector], ...] = ()  # removal entries still open
    unmatched: list[CacheList] = field(default_factory=list)
    purge_done: bool = False
    finalize_done: bool = False
    refresh_done: bool = False

    @property
    def has_orders(self) -> bool:
        return any(self.pulls.values()) or any(self.pins.values()) or any(self.removals.values())

    @property
    def settled(self) -> bool:
        """Nothing in flight or left to order for this cache."""
        return (
            not self.has_orders
            and not self.removing
            and all(p.phase in DONE_PHASES for p in self.pairs)
        )

    @property
    def next_retry(self) -> float | None:
        times = [p.retry_at for p in self.pairs if p.retry_at is not None]
        return min(times) if times else None


def backoff(failures: int, settings: Settings) -> float:
    return float(min(settings.retry_max, settings.retry_base * 2 ** max(0, failures - 1)))


def desired_pairs(
    spec: CacheSpec, nodes: Mapping[str, Mapping[str, str]]
) -> tuple[dict[tuple[str, str], bool], list[CacheList]]:
    """(node, image) -> pin wanted, for every list; and the lists that match no node."""
    wanted: dict[tuple[str, str], bool] = {}
    unmatched = []
    for cache_list in spec.lists:
        matched = [n for n, labels in nodes.items() if cache_list.matches(labels)]
        if not matched:
            unmatched.append(cache_list)
        for node in matched:
            for image in cache_list.images:
                key = (node, image)
                wanted[key] = wanted.get(key, False) or cache_list.pin
    return wanted, unmatched


def _pairs_of(
    lists: Iterable[tuple[str, Selector]], nodes: Mapping[str, Mapping[str, str]]
) -> set[tuple[str, str]]:
    return {
        (node, image)
        for image, selector in lists
        for node, labels in nodes.items()
        if all(labels.get(k) == v for k, v in selector)
    }


def list_pairs(lists: Iterable[CacheList]) -> set[tuple[str, Selector]]:
    return {(image, cl.node_selector) for cl in lists for image in cl.images}


def plan_cache(
    view: CacheView,
    nodes: Mapping[str, Mapping[str, str]],
    observations: Mapping[str, NodeObservation],
    others: OthersWant,
    in_flight_by_image: Mapping[str, int],
    settings: Settings,
    now: float,
) -> Plan:
    plan = Plan()
    if view.deleting:
        _plan_unpin_all(view, nodes, observations, others, now, plan)
        return plan
    if view.spec is None:
        return plan
    wanted, plan.unmatched = desired_pairs(view.spec, nodes)
    current = list_pairs(view.spec.lists)
    removing = set(view.removing) | (list_pairs(view.applied) - current)
    plan.removing = tuple(
        sorted(_plan_removals(removing, wanted, nodes, observations, others, now, plan))
    )
    if view.purge:
        _plan_purge(wanted, observations, others, now, plan)
        return plan
    if view.dormant:
        return plan
    ordered: dict[str, int] = defaultdict(int)
    wave = view.spec.max_concurrent_nodes_per_image or settings.wave
    for (node, image), pin in sorted(wanted.items()):
        plan.pairs.append(
            _plan_pair(
                view,
                node,
                image,
                pin,
                observations.get(node),
                others,
                in_flight_by_image,
                ordered,
                wave,
                settings,
                now,
                plan,
            )
        )
    plan.refresh_done = view.refresh_since is not None and plan.settled
    return plan


def _alive(obs: NodeObservation | None, now: float) -> bool:
    return obs is not None and obs.agent is not None and obs.agent.alive(now)


def _plan_pair(
    view: CacheView,
    node: str,
    image: str,
    pin: bool,
    obs: NodeObservation | None,
    others: OthersWant,
    in_flight_by_image: Mapping[str, int],
    ordered: dict[str, int],
    wave: int | None,
    settings: Settings,
    now: float,
    plan: Plan,
) -> PairState:
    ref = parse(image)
    key = ref.canonical
    if obs is None or obs.agent is None or not obs.agent.alive(now):
        why = (
            "no agent has registered for this node"
            if obs is None or obs.agent is None
            else ("the agent's Lease expired: the agent is gone or cannot reach the API server")
        )
        return PairState(node, image, PairPhase.AGENT_UNAVAILABLE, Reason.AGENT_UNAVAILABLE, why)
    if obs.inventory is None:
        return PairState(node, image, PairPhase.PENDING, message="listing the node's images")
    record = obs.pulls.get(key)
    if record is not None and record.in_flight:
        phase = PairPhase.PULLING if record.phase == OrderPhase.PULLING else PairPhase.WAITING
        return PairState(
            node, image, phase, bytes_done=record.bytes_done, bytes_total=record.bytes_total
        )
    present = obs.inventory.lookup(ref)
    refreshed = (
        record is not None
        and view.refresh_since is not None
        and record.finished >= view.refresh_since
    )
    stale = view.refresh_since is not None and ref.is_mutable and not refreshed
    if present is not None and not stale:
        pinned = present.pinned
        if obs.pinning_supported and key not in obs.pins_in_flight:
            if pin and not present.pinned:
                plan.pins[node].append((image, True))  # re-pin what lost its pin
            elif not pin and present.pin_owned and not others(node, ref)[1]:
                plan.pins[node].append((image, False))  # the list's pin switch was turned off
        return PairState(
            node, image, PairPhase.READY, digest=obs.inventory.digest_of(ref), pinned=pinned
        )
    if record is not None and record.phase == OrderPhase.FAILED:
        permanent = record.category in PERMANENT_CATEGORIES
        retry_at = None if permanent else record.finished + backoff(record.failures, settings)
        refresh_retry = view.refresh_since is not None and record.finished < view.refresh_since
        if not refresh_retry and (retry_at is None or now < retry_at):
            return PairState(
                node, image, PairPhase.FAILED, record.category, record.message, retry_at=retry_at
            )
    if wave is not None and in_flight_by_image.get(key, 0) + ordered[key] >= wave:
        return PairState(
            node,
            image,
            PairPhase.QUEUED,
            message=f"waiting for a wave slot (max {wave} nodes at once)",
        )
    ordered[key] += 1
    always = stale or (settings.always_pull and record is None)
    plan.pulls[node].append(PullItem(image, always=always, pin=pin and obs.pinning_supported))
    return PairState(node, image, PairPhase.PENDING, message="pull ordered")


def _release(
    node: str,
    image: str,
    obs: NodeObservation,
    others: OthersWant,
    plan: Plan,
) -> bool:
    """Orders the image off the node (or only its pin off, if another cache wants it).
    Returns True while the node still holds something to release."""
    ref = parse(image)
    key = ref.canonical
    assert obs.inventory is not None
    present = obs.inventory.lookup(ref)
    if present is None:
        return False
    wanted, pin_wanted = others(node, ref)
    if wanted:
        if present.pin_owned and not pin_wanted and key not in obs.pins_in_flight:
            plan.pins[node].append((image, False))
            return True
        return key in obs.pins_in_flight
    if key not in obs.removals_in_flight and key not in obs.removal_errors:
        plan.removals[node].append(image)
    return key not in obs.removal_errors


def _plan_removals(
    removing: set[tuple[str, Selector]],
    wanted: Mapping[tuple[str, str], bool],
    nodes: Mapping[str, Mapping[str, str]],
    observations: Mapping[str, NodeObservation],
    others: OthersWant,
    now: float,
    plan: Plan,
) -> set[tuple[str, Selector]]:
    """Images that left the spec: removed from the nodes their old list matched."""
    still_open = set()
    for entry in removing:
        image, _ = entry
        busy = False
        for node, _ in _pairs_of([entry], nodes):
            if (node, image) in wanted:
                continue  # still in the spec for this node (moved to another list)
            obs = observations.get(node)
            if not _alive(obs, now) or obs is None or obs.inventory is None:
                continue  # an agent that is gone cannot be asked; its pins are swept on return
            busy |= _release(node, image, obs, others, plan)
        if busy:
            still_open.add(entry)
    return still_open


def _plan_purge(
    wanted: Mapping[tuple[str, str], bool],
    observations: Mapping[str, NodeObservation],
    others: OthersWant,
    now: float,
    plan: Plan,
) -> None:
    busy = False
    for node, image in sorted(wanted):
        obs = observations.get(node)
        if not _alive(obs, now) or obs is None or obs.inventory is None:
            plan.pairs.append(
                PairState(node, image, PairPhase.AGENT_UNAVAILABLE, Reason.AGENT_UNAVAILABLE)
            )
            continue
        key = parse(image).canonical
        if key in obs.removal_errors:
            plan.pairs.append(
                PairState(node, image, PairPhase.FAILED, "RemoveFailed", obs.removal_errors[key])
            )
            continue
        holding = _release(node, image, obs, others, plan)
        busy |= holding
        plan.pairs.append(
            PairState(node, image, PairPhase.REMOVING if holding else PairPhase.REMOVED)
        )
    plan.purge_done = not busy


def _plan_unpin_all(
    view: CacheView,
    nodes: Mapping[str, Mapping[str, str]],
    observations: Mapping[str, NodeObservation],
    others: OthersWant,
    now: float,
    plan: Plan,
) -> None:
    """Deletion: lift every pin this cache set (others' wishes kept), then let go."""
    lists = (
        list_pairs(view.spec.lists if view.spec else ())
        | list_pairs(view.applied)
        | set(view.removing)
    )
    busy = False
    for node, image in sorted(_pairs_of(lists, nodes)):
        obs = observations.get(node)
        if not _alive(obs, now) or obs is None or obs.inventory is None:
            continue
        ref = parse(image)
        present = obs.inventory.lookup(ref)
        if ref.canonical in obs.pins_in_flight:
            busy = True
        elif present is not None and present.pin_owned and not others(node, ref)[1]:
            plan.pins[node].append((image, False))
            busy = True
    plan.finalize_done = not busy
