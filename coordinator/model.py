"""What the coordinator knows about nodes and agents: plain data, no I/O.

One `NodeObservation` per node holds the agent's last inventory (ListImages) and the
record of every order sent to it. The planner reads these; the node workers write
them as answers and pull events arrive.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from enum import StrEnum

from common.reference import ImageRef


@dataclass(frozen=True)
class AgentInfo:
    node: str
    endpoint: str
    tls: bool
    expires: float  # epoch seconds: renewTime + leaseDurationSeconds
    acquired: str = ""  # the Lease's acquireTime: a new one is a new agent process

    def alive(self, now: float) -> bool:
        return now < self.expires


@dataclass(frozen=True)
class NodeImage:
    image_id: str
    tags: frozenset[str]  # name:tag, normalized
    digests: frozenset[str]  # name@sha256:..., normalized
    pinned: bool
    pin_owned: bool
    size: int

    @functools.cached_property
    def digest_by_name(self) -> dict[str, str]:
        """Repository name -> manifest digest (asked once per node x image per plan)."""
        out: dict[str, str] = {}
        for entry in self.digests:
            name, _, digest = entry.partition("@")
            out.setdefault(name, digest)
        return out


@functools.lru_cache(maxsize=16384)
def shared_image(
    image_id: str,
    tags: frozenset[str],
    digests: frozenset[str],
    pinned: bool,
    pin_owned: bool,
    size: int,
) -> NodeImage:
    """One object for an image held alike by many nodes (5,000 nodes x 20 images would
    otherwise keep 100,000 copies of the same names)."""
    return NodeImage(image_id, tags, digests, pinned, pin_owned, size)


class Inventory:
    """The images on one node, looked up by tag or digest."""

    def __init__(self, images: list[NodeImage], synced_at: float) -> None:
        self.images = images
        self.synced_at = synced_at
        self._by_tag = {t: i for i in images for t in i.tags}
        self._by_digest = {d: i for i in images for d in i.digests}

    def lookup(self, ref: ImageRef) -> NodeImage | None:
        if ref.digest:
            return self._by_digest.get(ref.lookup_key)
        return self._by_tag.get(ref.lookup_key)

    def same_images(self, other: Inventory) -> bool:
        """Equal holdings (images are shared objects, so mostly an identity check)."""
        return len(self.images) == len(other.images) and {i.image_id: i for i in self.images} == {
            i.image_id: i for i in other.images
        }

    def replace(self, image: NodeImage) -> Inventory:
        """A copy where `image` (same id) replaces the old entry, or is added."""
        rest = [i for i in self.images if i.image_id != image.image_id]
        return Inventory([*rest, image], self.synced_at)


class OrderPhase(StrEnum):
    SENT = "Sent"  # ordered, no answer yet
    WAITING = "Waiting"  # the agent queued it behind its concurrency cap
    PULLING = "Pulling"
    DONE = "Done"
    FAILED = "Failed"


IN_FLIGHT = frozenset({OrderPhase.SENT, OrderPhase.WAITING, OrderPhase.PULLING})

# Failures that a retry cannot fix until something changes (spec, secret, refresh).
UNAUTHORIZED = "Unauthorized"
PERMANENT_CATEGORIES = frozenset({"NotFound", UNAUTHORIZED, "InvalidReference"})


@dataclass(slots=True)
class PullRecord:
    """The latest pull order of one image (canonical reference) on one node."""

    phase: OrderPhase
    started: float
    finished: float = 0.0
    bytes_done: int = 0
    bytes_total: int = 0
    digest: str = ""
    category: str = ""
    message: str = ""
    failures: int = 0  # consecutive, for backoff
    credentials: str = ""  # the ordering cache's pull Secrets then (CacheView.credentials)

    @property
    def in_flight(self) -> bool:
        return self.phase in IN_FLIGHT


_VERSIONS = itertools.count(1)


def stamp() -> int:
    """A version number: every change recorded after this call gets a larger one."""
    return next(_VERSIONS)


@dataclass
class NodeObservation:
    """What is known of one node, with version numbers the planner compares to keep
    what it planned while it still holds: `version` moves on a change that may touch
    every image (a new agent, a fresh listing, pins), `key_versions` on a change of
    some images only (an order, an answer). Numbers are never reused, not even by a
    new observation of the node."""

    agent: AgentInfo | None = None
    inventory: Inventory | None = None  # None until the agent has been listed
    # The last listing by any agent process: what the node held when last seen. Counts
    # as present while no agent can be asked (a restart, a DaemonSet rolling update):
    # a cache does not flap for an agent pod's restart. Nothing is ordered from it.
    last_seen: Inventory | None = None
    pinning_supported: bool = True
    pulls: dict[str, PullRecord] = field(default_factory=dict)
    pins_in_flight: set[str] = field(default_factory=set)
    removals_in_flight: set[str] = field(default_factory=set)
    removal_errors: dict[str, str] = field(default_factory=dict)
    version: int = field(default_factory=stamp)
    key_versions: dict[str, int] = field(default_factory=dict)  # canonical or lookup key

    def unlist(self) -> None:
        """The agent went or another process took over: list the node again before
        acting; until then its last listing is what it holds."""
        if self.inventory is not None:
            self.last_seen = self.inventory
        self.inventory = None

    def held(self) -> Inventory | None:
        """What the node holds as far as known: the current listing, or the last."""
        return self.inventory if self.inventory is not None else self.last_seen

    def touch(self, *keys: str) -> None:
        """Records a change of the images under `keys`, or of anything when none given."""
        if keys:
            version = next(_VERSIONS)
            for key in keys:
                self.key_versions[key] = version
        else:
            self.version = next(_VERSIONS)
            self.key_versions.clear()  # all older than the node's version now

    def changed_since(self, version: int, ref: ImageRef) -> bool:
        versions = self.key_versions
        return versions.get(ref.canonical, 0) > version or versions.get(ref.lookup_key, 0) > version

    def add_pulled(
        self,
        image_id: str,
        tags: frozenset[str],
        digests: frozenset[str],
        pinned: bool,
        size: int,
    ) -> None:
        """A pull's answer: the image joins the inventory, merged with what the node
        held under that id; every reference it answers to counts as changed."""
        assert self.inventory is not None
        old = next((i for i in self.inventory.images if i.image_id == image_id), None)
        owned = pinned
        if old is not None:
            tags, digests, owned = tags | old.tags, digests | old.digests, owned or old.pin_owned
        image = shared_image(image_id, tags, digests, pinned, owned, size)
        self.inventory = self.inventory.replace(image)
        self.touch(*(image.tags | image.digests))
