"""The decision: what one ImageCache wants, what the nodes hold, and the orders that
close the gap. A pure function over plain data, so every rule is unit-tested.

The plan is made node by node. Given a `PlanMemo`, a node whose inputs are the same as
last time (labels, the observation's version, the cache's spec and the other caches)
keeps its previous `NodePlan`, so a reconcile costs what changed, not nodes x images.

Safe to run any number of times: an order already in flight is never sent again, an
image already present is not pulled again (unless a refresh asks), and images or pins
another cache still wants are never removed or lifted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from common.reference import ImageRef, parse

from .api import CacheList, CacheSpec, Reason
from .model import (
    PERMANENT_CATEGORIES,
    UNAUTHORIZED,
    NodeImage,
    NodeObservation,
    OrderPhase,
    stamp,
)
from .pairs import NodePlan, PairPhase, PairState, PullItem, Tally

Selector = tuple[tuple[str, str], ...]
# (node, image) -> (another cache wants it on that node, another cache wants it pinned)
OthersWant = Callable[[str, ImageRef], tuple[bool, bool]]


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
    # The pull Secrets as they are now (names and versions): a pull refused as
    # Unauthorized with other credentials is tried again.
    credentials: str = ""

    @property
    def dormant(self) -> bool:
        """Purged at this generation: hold no images until an edit or a refresh."""
        return (
            self.purged_generation == self.generation
            and not self.purge
            and self.refresh_since is None
        )


@dataclass
class Plan:
    tally: Tally = field(default_factory=Tally)
    pulls: dict[str, list[PullItem]] = field(default_factory=lambda: defaultdict(list))
    pins: dict[str, list[tuple[str, bool]]] = field(default_factory=lambda: defaultdict(list))
    removals: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    removing: tuple[tuple[str, Selector], ...] = ()  # removal entries still open
    unmatched: list[CacheList] = field(default_factory=list)
    purge_done: bool = False
    finalize_done: bool = False
    refresh_done: bool = False

    @classmethod
    def of_pairs(cls, pairs: Iterable[PairState]) -> Plan:
        return cls(tally=Tally.of_pairs(pairs))

    @property
    def pairs(self) -> list[PairState]:
        return self.tally.all_pairs()

    @property
    def has_orders(self) -> bool:
        return any(self.pulls.values()) or any(self.pins.values()) or any(self.removals.values())

    @property
    def settled(self) -> bool:
        """Nothing in flight or left to order for this cache."""
        return not self.has_orders and not self.removing and self.tally.open == 0

    @property
    def next_retry(self) -> float | None:
        return self.tally.next_retry

    def put(self, node: str, node_plan: NodePlan) -> None:
        self.tally.put(node, node_plan)
        if node_plan.pulls:
            self.pulls[node].extend(node_plan.pulls)
        if node_plan.pins:
            self.pins[node].extend(node_plan.pins)


class PlanMemo:
    """One cache's last plan, node by node, and what each node's share was made from."""

    def __init__(self) -> None:
        self.context: Hashable = None
        self.tally = Tally()
        # per node: the lists it matched, its observation's version, and when it was planned
        self.inputs: dict[str, tuple[tuple[int, ...], int, int]] = {}
        self._lists: tuple[CacheList, ...] = ()
        self._matched: dict[str, tuple[Mapping[str, str], tuple[int, ...]]] = {}

    def matched(
        self, lists: tuple[CacheList, ...]
    ) -> dict[str, tuple[Mapping[str, str], tuple[int, ...]]]:
        """Per node, the labels object last seen and the lists they matched. The
        informer replaces a Node's labels on every change, so the same object means
        the same labels."""
        if lists != self._lists:
            self._lists, self._matched = lists, {}
        return self._matched

    def start(self, context: Hashable) -> Tally:
        """The tally to update; emptied when anything every node depends on changed."""
        if context != self.context:
            self.context = context
            self.tally = Tally()
            self.inputs = {}
        return self.tally


def backoff(failures: int, settings: Settings) -> float:
    return float(min(settings.retry_max, settings.retry_base * 2 ** max(0, failures - 1)))


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


Wanted = tuple[tuple[str, ImageRef, bool], ...]  # image, parsed, pin wanted


def _wanted(lists: tuple[CacheList, ...], matched: tuple[int, ...]) -> Wanted:
    pins: dict[str, bool] = {}
    for i in matched:
        for image in lists[i].images:
            pins[image] = pins.get(image, False) or lists[i].pin
    return tuple((image, parse(image), pins[image]) for image in sorted(pins))


def plan_cache(
    view: CacheView,
    nodes: Mapping[str, Mapping[str, str]],
    observations: Mapping[str, NodeObservation],
    others: OthersWant,
    in_flight_by_image: Mapping[str, int],
    settings: Settings,
    now: float,
    memo: PlanMemo | None = None,
    others_token: Hashable = None,
) -> Plan:
    """`others_token` changes whenever `others` may answer differently (with a memo)."""
    plan = Plan()
    if view.deleting:
        _plan_unpin_all(view, nodes, observations, others, now, plan)
        return plan
    if view.spec is None:
        return plan
    lists = view.spec.lists
    if memo is None:
        memo = PlanMemo()
    matches, plan.unmatched = _match(lists, nodes, memo)
    removing = set(view.removing) | (list_pairs(view.applied) - list_pairs(lists))
    if removing or view.purge:
        wanted = {
            (n, image) for n, found in matches.items() for i in found for image in lists[i].images
        }
        plan.removing = tuple(
            sorted(_plan_removals(removing, wanted, nodes, observations, others, now, plan))
        )
        if view.purge:
            _plan_purge(sorted(wanted), observations, others, now, plan)
            return plan
    if view.dormant:
        return plan
    wave = view.spec.max_concurrent_nodes_per_image or settings.wave
    plan.tally = memo.start(
        (view.spec, view.refresh_since, view.credentials, settings, others_token)
    )
    planner = _Planner(view, others, in_flight_by_image, wave, settings, now)
    wants: dict[tuple[int, ...], Wanted] = {}
    planned_at = stamp()
    for node in sorted(matches):
        found = matches[node]
        want = wants.get(found)
        if want is None:
            want = wants[found] = _wanted(lists, found)
        obs = observations.get(node)
        version = obs.version if obs is not None else -1
        node_plan = planner.again(
            node, want, obs, plan.tally.nodes.get(node), memo.inputs.get(node), (found, version)
        )
        if node_plan is not None:
            plan.put(node, node_plan)
        memo.inputs[node] = (found, version, planned_at)
    for node in [n for n in plan.tally.nodes if n not in matches]:
        plan.tally.put(node, None)
        memo.inputs.pop(node, None)
    plan.refresh_done = view.refresh_since is not None and plan.settled
    return plan


def _match(
    lists: tuple[CacheList, ...], nodes: Mapping[str, Mapping[str, str]], memo: PlanMemo
) -> tuple[dict[str, tuple[int, ...]], list[CacheList]]:
    """Per node, the lists it matches (none: left out); and the lists matching no node."""
    seen = memo.matched(lists)
    matches: dict[str, tuple[int, ...]] = {}
    matched_any = [False] * len(lists)
    for node, labels in nodes.items():
        known = seen.get(node)
        if known is not None and known[0] is labels:
            found = known[1]
        else:
            found = tuple(i for i, cl in enumerate(lists) if cl.matches(labels))
            seen[node] = (labels, found)
        if found:
            matches[node] = found
            for i in found:
                matched_any[i] = True
    if len(seen) > len(nodes):  # Nodes were deleted
        for gone in [n for n in seen if n not in nodes]:
            del seen[gone]
    return matches, [cl for cl, hit in zip(lists, matched_any, strict=True) if not hit]


def _alive(obs: NodeObservation | None, now: float) -> bool:
    return obs is not None and obs.agent is not None and obs.agent.alive(now)


@dataclass
class _Planner:
    """What every node's plan in one call shares, and the wave slots handed out so far."""

    view: CacheView
    others: OthersWant
    in_flight_by_image: Mapping[str, int]
    wave: int | None
    settings: Settings
    now: float
    ordered: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def again(
        self,
        node: str,
        want: Wanted,
        obs: NodeObservation | None,
        kept: NodePlan | None,
        inputs: tuple[tuple[int, ...], int, int] | None,
        current: tuple[tuple[int, ...], int],
    ) -> NodePlan | None:
        """The node's plan now; None when the one `kept` from last time still holds.

        `inputs`: the lists matched, the observation's version and the stamp of the last
        plan; `current`: the lists matched and the version now."""
        if (
            kept is None
            or inputs is None
            or inputs[:2] != current
            or self.now >= kept.valid_until
            or kept.has_orders
            or (kept.queued and self._slot_open(kept, want))
        ):
            return self.node(node, want, obs)
        if obs is None or not obs.key_versions:
            return None  # nothing changed on the node
        changed = [i for i, w in enumerate(want) if obs.changed_since(inputs[2], w[1])]
        if not changed:
            return None
        if not _alive(obs, self.now) or obs.inventory is None:
            return self.node(node, want, obs)
        # Only some images changed (orders sent, answers in): replan those.
        assert obs.agent is not None
        pairs = list(kept.pairs)
        pulls: list[PullItem] = []
        pins: list[tuple[str, bool]] = []
        for i in changed:
            image, ref, pin = want[i]
            pairs[i] = self.pair(node, image, ref, pin, obs, pulls, pins)
        return NodePlan.of(pairs, pulls, pins, obs.agent.expires)

    def _slot_open(self, kept: NodePlan, want: Wanted) -> bool:
        """Whether an image the node waits on for a wave slot could get one now."""
        wave = self.wave
        if wave is None:
            return True
        for pair, (_, ref, _) in zip(kept.pairs, want, strict=True):
            if pair.phase is PairPhase.QUEUED:
                key = ref.canonical
                if self.in_flight_by_image.get(key, 0) + self.ordered[key] < wave:
                    return True
        return False

    def node(self, node: str, want: Wanted, obs: NodeObservation | None) -> NodePlan:
        if obs is None or obs.agent is None or not obs.agent.alive(self.now):
            why = (
                "no agent has registered for this node"
                if obs is None or obs.agent is None
                else "the agent's Lease expired: the agent is gone or cannot reach the API server"
            )
            return NodePlan.of(
                (
                    _as_last_seen(node, image, ref, obs)
                    or PairState(
                        node, image, PairPhase.AGENT_UNAVAILABLE, Reason.AGENT_UNAVAILABLE, why
                    )
                    for image, ref, _ in want
                ),
                unknown=obs is None or obs.held() is None,
            )
        if obs.inventory is None:
            return NodePlan.of(
                (
                    _as_last_seen(node, image, ref, obs)
                    or PairState(
                        node, image, PairPhase.PENDING, message="listing the node's images"
                    )
                    for image, ref, _ in want
                ),
                valid_until=obs.agent.expires,
                unknown=obs.held() is None,
            )
        pulls: list[PullItem] = []
        pins: list[tuple[str, bool]] = []
        pairs = [self.pair(node, image, ref, pin, obs, pulls, pins) for image, ref, pin in want]
        return NodePlan.of(pairs, pulls, pins, obs.agent.expires)

    def pair(
        self,
        node: str,
        image: str,
        ref: ImageRef,
        pin: bool,
        obs: NodeObservation,
        pulls: list[PullItem],
        pins: list[tuple[str, bool]],
    ) -> PairState:
        """One image on one node with a live, listed agent; orders go to `pulls`, `pins`."""
        assert obs.inventory is not None
        key = ref.canonical
        record = obs.pulls.get(key)
        if record is not None and record.in_flight:
            phase = PairPhase.PULLING if record.phase is OrderPhase.PULLING else PairPhase.WAITING
            return PairState(node, image, phase, "", "", record.bytes_done, record.bytes_total)
        present = obs.inventory.lookup(ref)
        since = self.view.refresh_since
        refreshed = since is not None and record is not None and record.finished >= since
        stale = since is not None and ref.is_mutable and not refreshed
        # --image-pull-policy=Always: pulled once at this coordinator's first sync of the
        # image on the node, present or not, so the registry checks the credentials; a
        # refusal then stands (and is retried as a pull) though the image is there.
        first_sync = self.settings.always_pull and record is None
        refused = (
            self.settings.always_pull and record is not None and record.phase is OrderPhase.FAILED
        )
        if present is not None and not stale and not first_sync and not refused:
            if obs.pinning_supported and key not in obs.pins_in_flight:
                if pin and not present.pinned:
                    pins.append((image, True))  # re-pin what lost its pin
                elif not pin and present.pin_owned and not self.others(node, ref)[1]:
                    pins.append((image, False))  # the list's pin switch was turned off
            digest = present.digest_by_name.get(ref.name, "")
            return PairState(node, image, PairPhase.READY, "", "", 0, 0, digest, present.pinned)
        if record is not None and record.phase is OrderPhase.FAILED:
            # Refused with other credentials than the cache's Secrets give now: worth
            # another try, at once the first time, then with backoff (two caches with
            # different Secrets for one image must not take turns at the registry).
            new_credentials = (
                record.category == UNAUTHORIZED and record.credentials != self.view.credentials
            )
            permanent = record.category in PERMANENT_CATEGORIES and not new_credentials
            retry_at = (
                None if permanent else record.finished + backoff(record.failures, self.settings)
            )
            if new_credentials and record.failures <= 1:
                retry_at = record.finished
            refresh_retry = since is not None and record.finished < since
            if not refresh_retry and (retry_at is None or self.now < retry_at):
                return PairState(
                    node,
                    image,
                    PairPhase.FAILED,
                    record.category,
                    record.message,
                    retry_at=retry_at,
                )
        wave = self.wave
        if wave is not None and self.in_flight_by_image.get(key, 0) + self.ordered[key] >= wave:
            return PairState(
                node,
                image,
                PairPhase.QUEUED,
                message=f"waiting for a wave slot (max {wave} nodes at once)",
            )
        self.ordered[key] += 1
        always = stale or first_sync or refused
        replace = stale and present is not None and not self._held_for_others(node, ref, present)
        pulls.append(
            PullItem(image, always=always, pin=pin and obs.pinning_supported, replace=replace)
        )
        return PairState(node, image, PairPhase.PENDING, message="pull ordered")

    def _held_for_others(self, node: str, ref: ImageRef, present: NodeImage) -> bool:
        """Whether another cache wants the content `ref` names now under another name
        (its digest, another tag): a refresh that moves `ref` must then leave it."""
        names = (present.tags - {ref.lookup_key}) | present.digests
        return any(self.others(node, parse(name))[0] for name in sorted(names))


def _as_last_seen(
    node: str, image: str, ref: ImageRef, obs: NodeObservation | None
) -> PairState | None:
    """Ready if the node held the image when last listed (no agent can tell more now)."""
    held = obs.held() if obs is not None else None
    present = held.lookup(ref) if held is not None else None
    if present is None:
        return None
    digest = present.digest_by_name.get(ref.name, "")
    return PairState(node, image, PairPhase.READY, "", "", 0, 0, digest, present.pinned)


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
    wanted: set[tuple[str, str]],
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
    wanted: list[tuple[str, str]],
    observations: Mapping[str, NodeObservation],
    others: OthersWant,
    now: float,
    plan: Plan,
) -> None:
    busy = False
    by_node: dict[str, list[PairState]] = defaultdict(list)
    for node, image in wanted:
        obs = observations.get(node)
        if not _alive(obs, now) or obs is None or obs.inventory is None:
            by_node[node].append(
                PairState(node, image, PairPhase.AGENT_UNAVAILABLE, Reason.AGENT_UNAVAILABLE)
            )
            continue
        key = parse(image).canonical
        if key in obs.removal_errors:
            by_node[node].append(
                PairState(node, image, PairPhase.FAILED, "RemoveFailed", obs.removal_errors[key])
            )
            continue
        holding = _release(node, image, obs, others, plan)
        busy |= holding
        by_node[node].append(
            PairState(node, image, PairPhase.REMOVING if holding else PairPhase.REMOVED)
        )
    for node, pairs in by_node.items():
        plan.tally.put(node, NodePlan.of(pairs))
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
