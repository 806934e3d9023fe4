"""What the planner finds for each node x image pair, a cache's pairs grouped per
node, and the sums over all of them that the cache's status is written from.

A cache over 5,000 nodes has 100,000 pairs. Nodes are planned one at a time, and each
node's result updates the `Tally` of every cache with a share of it: the sums the
status needs are kept node by node, so no status costs a pass over every pair. Pairs
name images by key (`images.ImageKey`); the status spells them as its cache does.
"""

from __future__ import annotations

import functools
import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final


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
FAILED_PHASES = frozenset({PairPhase.FAILED, PairPhase.AGENT_UNAVAILABLE})
ACTIVE_PHASES = frozenset({PairPhase.PULLING, PairPhase.WAITING})
# Phases whose pairs add more than one to their image's total (digest, bytes, failure).
_COUNTED = frozenset({PairPhase.READY, PairPhase.PULLING, *FAILED_PHASES})


# Immutable as model.PullRecord is: Final fields rather than frozen (made per pair).
@dataclass(slots=True, unsafe_hash=True)
class PullItem:
    image: Final[str]  # the image's key
    always: Final[bool]
    pin: Final[bool]
    replace: Final[bool] = False  # a refresh: the agent retires what the tag named before
    caches: Final[tuple[str, ...]] = ()  # the caches waiting for its answer


@dataclass(slots=True, unsafe_hash=True)
class PairState:
    """One image on one node, as planned. Its node is where it is kept (a node's
    result, a cache's NodePlan), not a field: alike states of the fleet's nodes are
    then one object (`shared_pair`), 100,000 of them at 5,000 nodes x 20 images."""

    image: Final[str]
    phase: Final[PairPhase]
    reason: Final[str] = ""
    message: Final[str] = ""
    bytes_done: Final[int] = 0
    bytes_total: Final[int] = 0
    digest: Final[str] = ""
    pinned: Final[bool] = False
    retry_at: Final[float | None] = None


shared_pair = functools.lru_cache(maxsize=16384)(PairState)


@dataclass(slots=True, unsafe_hash=True)
class NodePlan:
    """One cache's pairs on one node, with the counts the sums are kept from."""

    pairs: Final[tuple[PairState, ...]]
    ready: Final[int] = 0
    open: Final[int] = 0  # pairs not yet done
    retry_at: Final[float | None] = None
    unknown: Final[bool] = False  # the node never listed yet: what it holds is not known

    @classmethod
    def of(cls, pairs: Iterable[PairState], unknown: bool = False) -> NodePlan:
        states = tuple(pairs)
        ready = open_ = 0
        retry_at: float | None = None
        for p in states:
            phase = p.phase
            if phase is PairPhase.READY:
                ready += 1
            elif phase not in DONE_PHASES:
                open_ += 1
            if p.retry_at is not None and (retry_at is None or p.retry_at < retry_at):
                retry_at = p.retry_at
        return cls(states, ready, open_, retry_at, unknown)

    def row(self, node: str, spell: Callable[[str], str]) -> dict[str, object]:
        """The node's line in the status: how far along it is, and what it pulls."""
        row: dict[str, object] = {"node": node, "ready": self.ready, "total": len(self.pairs)}
        active = [p for p in self.pairs if p.phase in ACTIVE_PHASES]
        if active:
            row["pulling"] = [spell(p.image) for p in active]
            row["bytesDone"] = sum(p.bytes_done for p in active)
            row["bytesTotal"] = sum(p.bytes_total for p in active)
        return row


def _aligned(old: tuple[PairState, ...], new: tuple[PairState, ...]) -> bool:
    return len(old) == len(new) and all(a.image == b.image for a, b in zip(old, new, strict=True))


@dataclass
class ImageTally:
    total: int = 0
    ready: int = 0
    failed: int = 0
    pulling: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    digests: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Counts:
    """A snapshot of the sums Events are worded from."""

    nodes: int
    images: int
    totals: Mapping[str, int]
    failed: Mapping[str, int]


class Tally:
    """Sums over every pair of a plan, kept current one node at a time."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodePlan] = {}
        self.images: dict[str, ImageTally] = {}
        self.behind: dict[str, NodePlan] = {}  # nodes with pairs not ready
        self.failed: dict[str, dict[str, PairState]] = {}  # image -> node -> pair
        self.retries: dict[str, float] = {}  # node -> its earliest retry
        self.pairs = 0
        self.ready = 0
        self.open = 0
        self.unknown = 0  # nodes no agent of which was seen yet

    def put(self, node: str, plan: NodePlan | None) -> None:
        """Replaces the node's share (None: the node no longer has pairs here)."""
        old = self.nodes.pop(node, None)
        if plan is not None and not plan.pairs:
            plan = None
        if old is not None:
            self._count_node(node, old, -1)
        if plan is not None:
            self.nodes[node] = plan
            self._count_node(node, plan, 1)
        if old is not None and plan is not None and _aligned(old.pairs, plan.pairs):
            # Same images in the same order, as when the node's observation moved:
            # count only the pairs whose contribution changed.
            for before, after in zip(old.pairs, plan.pairs, strict=True):
                if before is after or (
                    before.phase is after.phase
                    and (before.phase not in _COUNTED or before == after)
                ):
                    continue
                self._count_pair(node, before, -1)
                self._count_pair(node, after, 1)
            return
        for gone in old.pairs if old is not None else ():
            self._count_pair(node, gone, -1)
        for new in plan.pairs if plan is not None else ():
            self._count_pair(node, new, 1)

    def _count_node(self, node: str, plan: NodePlan, sign: int) -> None:
        self.pairs += sign * len(plan.pairs)
        self.ready += sign * plan.ready
        self.open += sign * plan.open
        self.unknown += sign * plan.unknown
        if plan.ready < len(plan.pairs):
            if sign > 0:
                self.behind[node] = plan
            else:
                self.behind.pop(node, None)
        if plan.retry_at is not None:
            if sign > 0:
                self.retries[node] = plan.retry_at
            else:
                self.retries.pop(node, None)

    def _count_pair(self, node: str, pair: PairState, sign: int) -> None:
        image = self.images.get(pair.image)
        if image is None:
            image = self.images[pair.image] = ImageTally()
        image.total += sign
        phase = pair.phase
        if phase is PairPhase.READY:
            image.ready += sign
            if pair.digest:
                image.digests[pair.digest] += sign
                if not image.digests[pair.digest]:
                    del image.digests[pair.digest]
        elif phase is PairPhase.PULLING:
            image.pulling += sign
            image.bytes_done += sign * pair.bytes_done
            image.bytes_total += sign * pair.bytes_total
        elif phase in FAILED_PHASES:
            image.failed += sign
            failed = self.failed.setdefault(pair.image, {})
            if sign > 0:
                failed[node] = pair
            else:
                failed.pop(node, None)
                if not failed:
                    del self.failed[pair.image]
        if not image.total:
            del self.images[pair.image]

    @property
    def next_retry(self) -> float | None:
        return min(self.retries.values()) if self.retries else None

    def first_failures(self, image: str, limit: int) -> list[tuple[str, PairState]]:
        """The failed pairs of `image` on the first `limit` nodes by name."""
        failed = self.failed.get(image) or {}
        return [(n, failed[n]) for n in heapq.nsmallest(limit, failed)]

    def most_behind(self, limit: int) -> list[tuple[str, NodePlan]]:
        """Nodes not yet done, least ready first."""
        return heapq.nsmallest(
            limit,
            self.behind.items(),
            key=lambda item: (item[1].ready / len(item[1].pairs), item[0]),
        )

    def counts(self) -> Counts:
        return Counts(
            nodes=len(self.nodes),
            images=len(self.images),
            totals={i: t.total for i, t in self.images.items()},
            failed={i: t.failed for i, t in self.images.items() if t.failed},
        )

    def all_pairs(self) -> list[tuple[str, PairState]]:
        """Every pair with its node, by node then image (for tests and small caches;
        not the hot path)."""
        return [(node, p) for node in sorted(self.nodes) for p in self.nodes[node].pairs]

    @classmethod
    def of_pairs(cls, pairs: Iterable[tuple[str, PairState]]) -> Tally:
        by_node: dict[str, list[PairState]] = {}
        for node, pair in pairs:
            by_node.setdefault(node, []).append(pair)
        tally = cls()
        for node, states in by_node.items():
            tally.put(node, NodePlan.of(states))
        return tally
