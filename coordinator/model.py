"""What the coordinator knows about nodes and agents: plain data, no I/O.

One `NodeObservation` per node holds the agent's last inventory (ListImages) and the
record of every order sent to it. It is changed only through its own methods, called
by the node registry as orders go out and answers come in; each records the change
(`version`) and keeps the fleet-wide count of pulls in flight (`WaveSlots`) right.
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

from .images import ImageKey, key_or_none, lookup_name
from .waves import WaveSlots


@dataclass(frozen=True)
class AgentInfo:
    node: str
    endpoint: str
    tls: bool
    expires: float  # epoch seconds, by this process's clock (`observed`)
    acquired: str = ""  # the Lease's acquireTime: a new one is a new agent process
    renew_time: str = ""  # the Lease's renewTime as written, by the node's clock
    duration: float = 40.0  # leaseDurationSeconds

    def alive(self, now: float) -> bool:
        return now < self.expires

    def same_process(self, other: AgentInfo) -> bool:
        return (self.node, self.endpoint, self.tls, self.acquired) == (
            other.node,
            other.endpoint,
            other.tls,
            other.acquired,
        )


@dataclass
class LeaseView:
    """How far this process can vouch for the agents' Leases it holds, shared by every
    node. A Lease that ran out by the clock counts as run out only as of the last news
    read from the API server (a watch event, a relist, a read made to confirm): a
    watch gone silent or an API server down is our silence, not the agents'. After a
    read failed, the agents could not renew either: whatever comes next from the API
    server gives every agent a whole Lease (`NodeObservation.grace`), as a restart of
    the control plane must not read as every agent gone."""

    seen: float = math.inf  # epoch seconds of the newest news (inf: none tracked)
    unreachable: bool = False  # a read failed since: nobody could renew meanwhile

    def as_of(self, now: float) -> float:
        return min(now, self.seen)


def observed(agent: AgentInfo, before: AgentInfo | None, now: float) -> AgentInfo:
    """The Lease's expiry by this process's clock, as the node lifecycle controller and
    client-go's leader election judge Leases: a renewal seen now lasts a duration from
    now, whatever time the node's clock wrote (node clocks drift; one minutes behind
    would otherwise be taken for a dead agent for good, one ahead for alive too long).
    Only a Lease seen for the first time is dated by its renewTime (never later than
    now), so an agent that died before this process started is not taken for alive."""
    if before is not None and before.same_process(agent):
        if before.renew_time == agent.renew_time:
            return replace(agent, expires=before.expires)  # nothing renewed: not younger
        return replace(agent, expires=now + agent.duration)
    return replace(agent, expires=min(agent.expires - agent.duration, now) + agent.duration)


def renewed(old: AgentInfo | None, new: AgentInfo | None, now: float) -> bool:
    """Only the Lease's renewal moved: the same agent process, not run out, and not
    shortened (plans made with the old expiry stay right until then)."""
    return (
        old is not None
        and new is not None
        and old.alive(now)
        and new.expires >= old.expires
        and old.same_process(new)
    )


@dataclass(frozen=True)
class NodeImage:
    image_id: str
    tags: frozenset[ImageKey]  # name:tag
    digests: frozenset[ImageKey]  # name@sha256:...
    pinned: bool
    pin_owned: bool
    size: int

    @functools.cached_property
    def digest_by_name(self) -> dict[str, str]:
        """Repository name -> manifest digest."""
        out: dict[str, str] = {}
        for entry in self.digests:
            name, _, digest = entry.partition("@")
            out.setdefault(name, digest)
        return out


def names(references: Iterable[str]) -> frozenset[ImageKey]:
    """The keys of what a runtime reports (anything unparseable left out)."""
    return frozenset(k for k in map(key_or_none, references) if k is not None)


@functools.lru_cache(maxsize=16384)
def shared_image(
    image_id: str,
    tags: frozenset[ImageKey],
    digests: frozenset[ImageKey],
    pinned: bool,
    pin_owned: bool,
    size: int,
) -> NodeImage:
    """One object for an image held alike by many nodes (5,000 nodes x 20 images would
    otherwise keep 100,000 copies of the same names)."""
    return NodeImage(image_id, tags, digests, pinned, pin_owned, size)


class _Holdings:
    """An inventory's maps, shared by every node holding the same images (a fleet
    that pulled one cache holds one set: 5,000 copies of two maps were ~17 MiB).
    Never changed once made."""

    __slots__ = ("__weakref__", "by_id", "by_name")

    def __init__(self, by_id: dict[str, NodeImage], by_name: dict[ImageKey, NodeImage]) -> None:
        self.by_id = by_id
        self.by_name = by_name


# (number of images, sum of their object ids) -> the holdings of those images. The
# images are shared objects (shared_image), so equal holdings hold the same objects;
# a candidate is checked object by object, the sum only finds it.
_HOLDINGS: weakref.WeakValueDictionary[tuple[int, int], _Holdings] = weakref.WeakValueDictionary()


def _same(holdings: _Holdings, by_id: Mapping[str, NodeImage]) -> bool:
    mine = holdings.by_id
    return len(mine) == len(by_id) and all(mine.get(k) is v for k, v in by_id.items())


def _shared(
    by_id: dict[str, NodeImage], names: Callable[[], dict[ImageKey, NodeImage]]
) -> _Holdings:
    """The shared holdings of these images, made (`names`: their name map) if none
    is. Where two images claim one name the map depends on their order: such holdings
    (a passing state) are not shared; holdings found have none, nor then do these."""
    signature = (len(by_id), sum(map(id, by_id.values())))
    found = _HOLDINGS.get(signature)
    if found is not None and _same(found, by_id):
        return found
    holdings = _Holdings(by_id, names())
    clash = len(holdings.by_name) != sum(len(i.tags) + len(i.digests) for i in by_id.values())
    if found is None and not clash:
        _HOLDINGS[signature] = holdings
    return holdings


class Inventory:
    """The images on one node, looked up by key (tag or digest) or by id."""

    __slots__ = ("_held", "synced_at")

    def __init__(self, images: Iterable[NodeImage], synced_at: float) -> None:
        self.synced_at = synced_at
        by_id = {i.image_id: i for i in images}
        self._held = _shared(
            by_id, lambda: {n: i for i in by_id.values() for n in (*i.tags, *i.digests)}
        )

    @property
    def images(self) -> list[NodeImage]:
        return list(self._held.by_id.values())

    def lookup(self, key: ImageKey) -> NodeImage | None:
        return self._held.by_name.get(lookup_name(key))

    def by_id(self, image_id: str) -> NodeImage | None:
        return self._held.by_id.get(image_id)

    def resolve(self, name: str) -> str:
        """The image id an order's name (a key or an id) stands for on this node."""
        key = key_or_none(name)
        image = self.lookup(key) if key is not None else None
        return image.image_id if image is not None else name

    def same_images(self, other: Inventory) -> bool:
        """Equal holdings (images are shared objects, so mostly an identity check)."""
        return self._held is other._held or self._held.by_id == other._held.by_id

    def replace(self, image: NodeImage) -> Inventory:
        """A copy where `image` (same id) replaces the old entry, or is added. Every
        pull's answer makes one: the fleet's nodes answer alike, so most find the
        holdings another node made; otherwise the maps are copied whole (in C)
        instead of rebuilt."""
        old = self._held.by_id.get(image.image_id)
        by_id = dict(self._held.by_id)
        by_id.pop(image.image_id, None)
        by_id[image.image_id] = image
        copy = Inventory.__new__(Inventory)
        copy.synced_at = self.synced_at
        copy._held = _shared(by_id, lambda: self._names_after(image, old))
        return copy

    def _names_after(self, image: NodeImage, old: NodeImage | None) -> dict[ImageKey, NodeImage]:
        by_name = dict(self._held.by_name)
        for name in (*image.tags, *image.digests):
            by_name[name] = image
        if old is not None:
            for name in (old.tags | old.digests) - (image.tags | image.digests):
                if by_name.get(name) is old:  # another image holding it, if any
                    holders = [
                        i
                        for i in self._held.by_id.values()
                        if i is not old and name in i.tags | i.digests
                    ]
                    if holders:
                        by_name[name] = holders[-1]
                    else:
                        del by_name[name]
        return by_name


class OrderPhase(StrEnum):
    SENT = "Sent"  # ordered, no answer yet
    WAITING = "Waiting"  # the agent queued it behind its concurrency cap
    PULLING = "Pulling"
    DONE = "Done"
    FAILED = "Failed"


IN_FLIGHT = frozenset({OrderPhase.SENT, OrderPhase.WAITING, OrderPhase.PULLING})

# Failures that a retry cannot fix until something changes (spec, secret, refresh).
UNAUTHORIZED = "Unauthorized"
AGENT_UNAVAILABLE = "AgentUnavailable"
PERMANENT_CATEGORIES = frozenset({"NotFound", UNAUTHORIZED, "InvalidReference"})


@dataclass(slots=True, unsafe_hash=True)
class PullRecord:
    """The latest pull order of one image on one node. Immutable: a change is a new
    record, so the planner can tell an unchanged one by identity. Its fields are Final
    (mypy keeps them unassigned) rather than the class frozen: a frozen dataclass's
    __init__ costs five times as much, and a fleet-wide order makes 100,000 records."""

    phase: Final[OrderPhase]
    finished: Final[float] = 0.0
    bytes_done: Final[int] = 0
    bytes_total: Final[int] = 0
    digest: Final[str] = ""
    category: Final[str] = ""
    message: Final[str] = ""
    failures: Final[int] = 0  # consecutive, for backoff
    # the pull Secrets' versions it was sent with (Desire.credentials)
    credentials: Final[str] = ""

    @property
    def in_flight(self) -> bool:
        return self.phase in IN_FLIGHT


_VERSIONS = itertools.count(1)


def stamp() -> int:
    """A version number: every change recorded after this call gets a larger one."""
    return next(_VERSIONS)


@dataclass(slots=True, unsafe_hash=True)
class Pulled:
    """A pull's successful answer, as the agent reported it."""

    image_id: Final[str]
    tags: Final[frozenset[ImageKey]]
    digests: Final[frozenset[ImageKey]]
    pinned: Final[bool]
    size: Final[int]
    digest: Final[str] = ""
    bytes_done: Final[int] = 0
    bytes_total: Final[int] = 0


@dataclass
class NodeObservation:
    """What is known of one node. Fields are read by anyone, changed only by the
    methods below: each moves `version`, so a change is never missed."""

    agent: AgentInfo | None = None
    inventory: Inventory | None = None  # None until the agent has been listed
    # The last listing by any agent process: what the node held when last seen. Counts
    # as present while no agent can be asked (a restart, a DaemonSet rolling update):
    # a cache does not flap for an agent pod's restart. Nothing is ordered from it.
    last_seen: Inventory | None = None
    pinning_supported: bool = True
    pulls: dict[ImageKey, PullRecord] = field(default_factory=dict)
    pins_in_flight: set[str] = field(default_factory=set)  # image ids
    removals_in_flight: set[ImageKey] = field(default_factory=set)
    removal_errors: dict[ImageKey, str] = field(default_factory=dict)
    # Pulls no share wants any more, cancelled: the record each cancel was sent for
    # (sent again only for a newer record: an order not yet at the agent, say). None
    # while empty, as on almost every node.
    cancels_sent: dict[ImageKey, PullRecord] | None = None
    cancel_unsupported: bool = False  # this agent process predates CancelPulls
    # Pulls the last listing found under way that this process did not order (its
    # predecessor did): cancelled if no share wants them. None while empty.
    unordered: frozenset[ImageKey] | None = None
    # Why this agent process cannot be listed (its listings failed twice in a row):
    # said in the status instead of "listing the node's images" for good.
    unlisted: str = ""
    answers: int = 0  # pull answers merged: a listing taken meanwhile may predate one
    listed_answers: int = 0  # ... of them, those the last listing came after
    version: int = field(default_factory=stamp)
    slots: WaveSlots = field(default_factory=WaveSlots, repr=False)  # shared by the fleet
    view: LeaseView = field(default_factory=LeaseView, repr=False)  # shared by the fleet

    def held(self) -> Inventory | None:
        """What the node holds as far as known: the current listing, or the last."""
        return self.inventory if self.inventory is not None else self.last_seen

    def alive(self, now: float) -> bool:
        """By the agent's Lease, as of the last news of the Leases (`LeaseView`)."""
        return self.agent is not None and self.agent.alive(self.view.as_of(now))

    def unconfirmed(self, now: float) -> bool:
        """Run out by the clock, but not as of the last news: to be confirmed."""
        return self.agent is not None and not self.agent.alive(now) and self.alive(now)

    def grace(self, now: float) -> None:
        """The API server could not be read a while: the agent gets a whole Lease from
        now to renew in (it could not renew meanwhile either)."""
        if self.agent is not None:
            until = max(self.agent.expires, now + self.agent.duration)
            self.agent = replace(self.agent, expires=until)

    def _changed(self) -> None:
        self.version = stamp()

    @property
    def answered_since_listing(self) -> bool:
        """Pull answers merged into `inventory` since the last listing: until the next
        one (at the end of every pull batch), what else the node holds may be out of date."""
        return self.answers != self.listed_answers

    @property
    def settling(self) -> bool:
        """Pulls are under way or were answered since the last listing: a pin that
        looks unwanted may belong to content the node is about to hold or just let go."""
        return self.answered_since_listing or any(r.in_flight for r in self.pulls.values())

    def _record(self, key: ImageKey, record: PullRecord | None) -> None:
        """The one place a pull record is replaced: keeps the wave count right."""
        sent = self.cancels_sent
        if sent is not None and sent.pop(key, None) is not None and not sent:
            self.cancels_sent = None
        old = self.pulls.pop(key, None)
        if record is not None:
            self.pulls[key] = record
            if record.in_flight and (old is None or not old.in_flight):
                self.slots.started(key)
        if old is not None and old.in_flight and (record is None or not record.in_flight):
            self.slots.ended(key)

    # -- the agent -------------------------------------------------------------------

    def set_agent(self, agent: AgentInfo | None, now: float) -> tuple[bool, int]:
        """A Lease appeared, changed or went away. Returns whether the node must be
        listed (again), and how many orders lost with a previous agent process go to
        this one now (not after a backoff)."""
        old, self.agent = self.agent, agent
        if renewed(old, agent, self.view.as_of(now)) and self.inventory is not None:
            return False, 0  # the same agent, still alive and listed: nothing new
        self._changed()
        new_process = agent is not None and (old is None or not old.same_process(agent))
        if agent is None or new_process:
            self._unlist()
            self.cancel_unsupported = False
        lost = 0
        if new_process:
            for key in [
                k
                for k, r in self.pulls.items()
                if r.phase is OrderPhase.FAILED and r.category == AGENT_UNAVAILABLE
            ]:
                self._record(key, None)
                lost += 1
        return agent is not None and (new_process or self.inventory is None), lost

    def _unlist(self) -> None:
        """The agent went or another process took over: list the node again before
        acting; until then its last listing is what it holds."""
        if self.inventory is not None:
            self.last_seen = self.inventory
        self.inventory = None
        self.unlisted = ""

    def listing_failed(self, why: str) -> None:
        """The agent, alive by its Lease, cannot be listed (a network policy, a TLS
        mismatch): until it can, the node's pairs say why."""
        if self.inventory is None and why != self.unlisted:
            self.unlisted = why
            self._changed()

    def listed(
        self,
        inventory: Inventory,
        pinning_supported: bool | None,
        pulling: Iterable[ImageKey] = (),
    ) -> bool:
        """A fresh listing (and, with a new agent process, what its runtime can do;
        `pulling`: the agent's pulls under way). Returns whether anything changed
        beyond what the answers already said."""
        unordered = frozenset(
            key for key in pulling if (mine := self.pulls.get(key)) is None or not mine.in_flight
        )
        same = (
            unordered == (self.unordered or frozenset())
            and not self.answered_since_listing
            and self.inventory is not None
            and self.inventory.same_images(inventory)
            and not self.removal_errors
            and (pinning_supported is None or pinning_supported == self.pinning_supported)
        )
        self.inventory = inventory
        self.listed_answers = self.answers
        self.unlisted = ""
        self.unordered = unordered or None
        if same:
            return False
        if pinning_supported is not None:
            self.pinning_supported = pinning_supported
        self.removal_errors.clear()
        self._changed()
        return True

    def forget(self) -> None:
        """The Node is gone: its pulls in flight no longer count for any wave."""
        for key in list(self.pulls):
            self._record(key, None)
        self._changed()

    # -- pulls -----------------------------------------------------------------------

    def pulls_ordered(self, keys: Iterable[ImageKey], credentials: Mapping[ImageKey, str]) -> None:
        for key in keys:
            old = self.pulls.get(key)
            self._record(key, _sent(old.failures if old else 0, credentials.get(key, "")))
        self._changed()

    def _pull_record(self, key: ImageKey) -> PullRecord:
        record = self.pulls.get(key)
        return record if record is not None else _sent(0, "")

    def pull_progress(
        self, key: ImageKey, pulling: bool, done: int, total: int, now: float
    ) -> None:
        """WAITING (queued on the agent) or PULLING with bytes so far."""
        record = self._pull_record(key)
        if pulling:
            record = replace(record, phase=OrderPhase.PULLING, bytes_done=done, bytes_total=total)
        else:
            record = replace(record, phase=OrderPhase.WAITING)
        self._record(key, record)
        self._changed()

    def pull_succeeded(self, key: ImageKey, pulled: Pulled, dated: float) -> None:
        """`dated`: the record's `finished`. The only question asked of a success's
        date is whether it came after a refresh began, so the registry dates it by the
        latest refresh start (Refreshes.date), which answers that alike: the fleet's
        records of one answer are then one object, not 100,000."""
        before = self._pull_record(key)
        record = _done(
            pulled.bytes_done, pulled.bytes_total, pulled.digest, before.credentials, dated
        )
        self._record(key, record)
        if self.inventory is not None:
            old = self.inventory.by_id(pulled.image_id)
            tags, digests, owned = pulled.tags, pulled.digests, pulled.pinned
            if old is not None:
                tags, digests, owned = (
                    tags | old.tags,
                    digests | old.digests,
                    owned or old.pin_owned,
                )
            image = shared_image(pulled.image_id, tags, digests, pulled.pinned, owned, pulled.size)
            self.inventory = self.inventory.replace(image)
            self.answers += 1
        self._changed()

    def pull_failed(self, key: ImageKey, category: str, message: str, now: float) -> None:
        record = self._pull_record(key)
        self._record(key, _failed(record, category, message, now))
        self._changed()

    def pull_cancelled(self, key: ImageKey) -> None:
        """Stopped by our cancel: nothing of it is on the node, and no failure counts
        (wanted again later, it is pulled at once)."""
        self._record(key, None)
        self._changed()

    def cancels_ordered(self, keys: Iterable[ImageKey]) -> None:
        keys = tuple(keys)
        sent = self.cancels_sent if self.cancels_sent is not None else {}
        for key in keys:
            record = self.pulls.get(key)
            if record is not None:
                sent[key] = record
        self.cancels_sent = sent or None
        if self.unordered is not None:  # asked again only if the next listing shows it
            self.unordered = self.unordered.difference(keys) or None
        self._changed()

    def cancels_refused(self) -> None:
        """The agent process cannot cancel (an older one, during a rolling upgrade):
        its pulls run to their end, as before CancelPulls."""
        self.cancel_unsupported = True
        self._changed()

    def pulls_lost(self, keys: Iterable[ImageKey], message: str, now: float) -> None:
        """The stream broke: what it left unanswered failed with the agent."""
        for key in keys:
            record = self.pulls.get(key)
            if record is not None and record.in_flight:
                self._record(key, _failed(record, AGENT_UNAVAILABLE, message, now))
        self._changed()

    def pulls_forgotten(self, wanted: Container[ImageKey]) -> None:
        """Records of images no cache mentions here any more, and not in flight, go: a
        node's records grew with every image it was ever ordered, and a failure that
        outlived its cache was taken as final for the next cache wanting the image."""
        stale = [k for k, r in self.pulls.items() if k not in wanted and not r.in_flight]
        if stale:
            for key in stale:
                self._record(key, None)
            self._changed()

    # -- pins and removals -------------------------------------------------------------

    def pins_ordered(self, image_ids: Iterable[str]) -> None:
        self.pins_in_flight.update(image_ids)
        self._changed()

    def pins_answered(self, image_ids: Iterable[str]) -> None:
        self.pins_in_flight.difference_update(image_ids)
        self._changed()

    def removals_ordered(self, keys: Iterable[ImageKey]) -> None:
        self.removals_in_flight.update(keys)
        self._changed()

    def removals_answered(
        self, keys: Iterable[ImageKey], removed: Iterable[ImageKey], errors: Mapping[ImageKey, str]
    ) -> None:
        self.removals_in_flight.difference_update(keys)
        for key in removed:
            self._record(key, None)
        self.removal_errors.update(errors)
        self._changed()


@functools.lru_cache(maxsize=1024)
def _sent(failures: int, credentials: str) -> PullRecord:
    """An order's record until answered: the same for every node ordered alike (a
    fleet-wide order kept 100,000 equal records)."""
    return PullRecord(OrderPhase.SENT, failures=failures, credentials=credentials)


@functools.lru_cache(maxsize=4096)
def _done(
    bytes_done: int, bytes_total: int, digest: str, credentials: str, dated: float
) -> PullRecord:
    # Built whole rather than with dataclasses.replace: one per pull answered.
    return PullRecord(
        OrderPhase.DONE,
        finished=dated,
        bytes_done=bytes_done,
        bytes_total=bytes_total,
        digest=digest,
        credentials=credentials,
    )


def _failed(record: PullRecord, category: str, message: str, now: float) -> PullRecord:
    return replace(
        record,
        phase=OrderPhase.FAILED,
        finished=now,
        failures=record.failures + 1,
        category=category,
        message=message,
    )
