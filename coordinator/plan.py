"""The decision for one node: its desired state (every cache's share, `desired.py`)
against what it holds and what is in flight to it (`model.NodeObservation`), and the
one batch of orders that closes the gap. A pure function over plain data.

Safe to run any number of times: an order in flight is never sent again, an image
present is not pulled again (unless a refresh or the pull policy asks), an image some
cache wants is never removed, and a pin some cache wants pinned is never lifted. A
pull in flight that no share wants any more is cancelled (a deleted cache, an image
edited out or purged, a node that left a selector): a large image is not downloaded
to every node for nothing. A pin kube-fledged set that no share wants pinned is
lifted by the same rule that places pins: a node that left a selector, a deleted
cache, a list switched to `pin: false`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from .api import Reason
from .desired import Desire, NodeDesired
from .images import ImageKey, lookup_name, ref_of
from .model import (
    PERMANENT_CATEGORIES,
    UNAUTHORIZED,
    Inventory,
    NodeImage,
    NodeObservation,
    OrderPhase,
    PullRecord,
)
from .pairs import PairPhase, PairState, PullItem, shared_pair


@dataclass(frozen=True)
class Settings:
    always_pull: bool = False  # --image-pull-policy=Always
    wave: int | None = None  # --max-concurrent-nodes-per-image; None: unlimited
    retry_base: float = 30.0
    retry_max: float = 300.0


def backoff(failures: int, settings: Settings) -> float:
    return float(min(settings.retry_max, settings.retry_base * 2 ** max(0, failures - 1)))


class Release(Enum):
    """Where an image the node should let go of (removal, purge, a deleted cache's
    pin) stands."""

    DONE = "done"  # gone, or kept for another cache with only our pin lifted
    BUSY = "busy"  # ordered or in flight
    FAILED = "failed"  # the removal failed: not retried until the node is listed again
    AWAY = "away"  # no live, listed agent to ask


@dataclass
class NodeResult:
    node: str
    pairs: dict[ImageKey, PairState] = field(default_factory=dict)  # images wanted
    released: dict[ImageKey, Release] = field(default_factory=dict)  # images let go of
    removal_errors: dict[ImageKey, str] = field(default_factory=dict)
    pulls: list[PullItem] = field(default_factory=list)
    pins: list[tuple[str, bool]] = field(default_factory=list)  # image key (or id), pinned
    removals: list[ImageKey] = field(default_factory=list)
    cancels: tuple[ImageKey, ...] = ()  # pulls in flight no share wants
    queued: dict[ImageKey, int] = field(default_factory=dict)  # waiting for a wave slot
    pinning: set[ImageKey] = field(default_factory=set)  # wanted images being re-pinned
    # What each pair was made from (desire, pull record, image held: all immutable):
    # the next plan reuses a pair whose inputs are the same objects.
    basis: dict[ImageKey, tuple[object, ...]] = field(default_factory=dict, repr=False)
    unknown: bool = False  # never listed by this process: what it holds is not known

    @property
    def next_retry(self) -> float | None:
        """When time alone changes the answer: the first failed pull's retry."""
        return min((p.retry_at for p in self.pairs.values() if p.retry_at), default=None)


# Pairs that depend on nothing but their inputs (not on the clock or the wave slots).
REUSABLE = frozenset({PairPhase.READY, PairPhase.PULLING, PairPhase.WAITING})


# (ids of its objects) -> a pair's basis: the fleet's pairs planned alike share one
# tuple (its objects are shared: one desire per merged shares, one image per content,
# one record per order sent alike and per success alike), not one each (100,000 at
# 5,000 nodes x 20 images, 9 MiB). Records of one node only (progress, failures) are
# not kept here, nor is anything once it holds _BASES_MAX: it is cleared then. The
# tuples keep their objects alive, so the ids stay theirs.
_BASES: dict[tuple[int, int, int, bool], tuple[object, ...]] = {}
_BASES_MAX = 1024
_SHARED_RECORDS = frozenset({OrderPhase.SENT, OrderPhase.DONE})


def _basis(
    desire: Desire, record: PullRecord | None, present: NodeImage | None, pinning: bool
) -> tuple[object, ...]:
    if record is not None and record.phase not in _SHARED_RECORDS:
        return (desire, record, present, pinning)
    key = (id(desire), id(record), id(present), pinning)
    basis = _BASES.get(key)
    if basis is None:
        if len(_BASES) >= _BASES_MAX:
            _BASES.clear()
        basis = _BASES[key] = (desire, record, present, pinning)
    return basis


class _Map(dict[ImageKey, Any]):
    """A planned map that others may share: weakly referenced from _MAPS."""

    __slots__ = ("__weakref__",)


# (ids of its keys and values) -> a node's pairs or bases: nodes in the same state
# (a fleet-wide order puts thousands of nodes in a handful) share the maps, instead of
# two maps of 20 entries each per node (12 MiB at 5,000 nodes). A result's maps are
# never changed once planned; a map no result holds any more leaves by itself. Its
# entries are alive while it is, so the ids stay theirs.
_MAPS: weakref.WeakValueDictionary[tuple[int, ...], _Map] = weakref.WeakValueDictionary()
T = TypeVar("T")


def _shared_map(entries: dict[ImageKey, T]) -> dict[ImageKey, T]:
    if not entries:
        return entries
    key = (*map(id, entries), *map(id, entries.values()))
    shared = _MAPS.get(key)
    if shared is None:
        shared = _MAPS[key] = _Map(entries)
    return shared


def plan_node(
    node: str,
    desired: NodeDesired,
    obs: NodeObservation | None,
    settings: Settings,
    now: float,
    previous: NodeResult | None = None,
) -> NodeResult:
    """`previous`: the node's last result, whose pairs are kept where their inputs are
    the same objects (a node over 20 images with one answer in replans one pair)."""
    result = NodeResult(node)
    if obs is None or not obs.alive(now):
        why = (
            "no agent has registered for this node"
            if obs is None or obs.agent is None
            else "the agent's Lease expired: the agent is gone or cannot reach the API server"
        )
        result.unknown = obs is None or obs.held() is None
        _unreachable(
            result, desired, obs, PairPhase.AGENT_UNAVAILABLE, Reason.AGENT_UNAVAILABLE, why
        )
        return result
    if obs.inventory is None:
        result.unknown = obs.held() is None  # alive, but never listed by this process
        if obs.unlisted:
            why = f"the agent at {obs.agent.endpoint if obs.agent else '-'} cannot be listed: "
            phase, reason, message = PairPhase.AGENT_UNAVAILABLE, Reason.AGENT_UNAVAILABLE, why
            message += obs.unlisted
        else:
            phase, reason, message = PairPhase.PENDING, "", "listing the node's images"
        _unreachable(result, desired, obs, phase, reason, message)
        return result
    inventory = obs.inventory
    kept = previous.pairs if previous is not None else {}
    bases = previous.basis if previous is not None else {}
    held = {key: inventory.lookup(key) for key in desired.items}
    for key, desire in desired.items.items():
        if not desire.want:
            continue
        record, present = obs.pulls.get(key), held[key]
        pair, basis = kept.get(key), bases.get(key)
        if (
            basis is None
            or basis[0] is not desire
            or basis[1] is not record
            or basis[2] is not present
            or basis[3] is not obs.pinning_supported
        ):
            basis = _basis(desire, record, present, obs.pinning_supported)
            pair = None  # its inputs changed
        if pair is None or pair.phase not in REUSABLE:
            pair = _want(result, key, desire, desired, obs, present, settings, now)
        elif pair.phase is PairPhase.READY and present is not None:
            _repin(result, key, desire, present.pinned, obs)
        result.pairs[key] = pair
        result.basis[key] = basis
    result.pairs = _shared_map(result.pairs)
    result.basis = _shared_map(result.basis)
    if obs.unordered or not obs.pulls.keys() <= result.pairs.keys():  # most plans: neither
        result.cancels = _cancels(obs, result.pairs)
    lifting = _pins(result, desired, obs, inventory, held)
    letting_go = [(k, d) for k, d in desired.items.items() if d.remove or not d.want]
    if letting_go:  # most plans let nothing go: the wanted ids only when one does
        wanted = {
            present.image_id
            for key, present in held.items()
            if present is not None and desired.items[key].want
        }
        for key, desire in letting_go:
            result.released[key] = _release(result, key, desire, obs, held[key], lifting, wanted)
    return result


def _cancels(obs: NodeObservation, wanted: Mapping[ImageKey, PairState]) -> tuple[ImageKey, ...]:
    """Pulls in flight that no share wants, but for those a cancel went out for
    already (sent again only for a newer record: the order may not have reached the
    agent when the first one did), and those the agent's listing shows that a
    predecessor of this process ordered."""
    if obs.cancel_unsupported:
        return ()
    sent = obs.cancels_sent or {}
    ours = {
        key
        for key, record in obs.pulls.items()
        if record.in_flight and key not in wanted and sent.get(key) is not record
    }
    theirs = {key for key in obs.unordered or () if key not in wanted}
    return tuple(sorted(ours | theirs))


def _unreachable(
    result: NodeResult,
    desired: NodeDesired,
    obs: NodeObservation | None,
    phase: PairPhase,
    reason: str,
    message: str,
) -> None:
    """No order can go: what the node held when last listed stays Ready (no agent can
    tell more now), the rest waits; nothing is released."""
    held = obs.held() if obs is not None else None
    for key, desire in desired.items.items():
        if desire.want:
            present = held.lookup(key) if held is not None else None
            if present is not None:
                digest = present.digest_by_name.get(ref_of(key).name, "")
                result.pairs[key] = shared_pair(
                    key, PairPhase.READY, "", "", 0, 0, digest, present.pinned
                )
            else:
                result.pairs[key] = shared_pair(key, phase, reason, message)
        if desire.remove or not desire.want:
            result.released[key] = Release.AWAY


def _want(
    result: NodeResult,
    key: ImageKey,
    desire: Desire,
    desired: NodeDesired,
    obs: NodeObservation,
    present: NodeImage | None,
    settings: Settings,
    now: float,
) -> PairState:
    """One wanted image on a node with a live, listed agent; its pull, if it needs one,
    goes to `result`."""
    record = obs.pulls.get(key)
    if record is not None and record.in_flight:
        phase = PairPhase.PULLING if record.phase is OrderPhase.PULLING else PairPhase.WAITING
        return shared_pair(key, phase, "", "", record.bytes_done, record.bytes_total)
    ref = ref_of(key)
    since = desire.refresh_since
    refreshed = since is not None and record is not None and record.finished >= since
    stale = since is not None and ref.is_mutable and not refreshed
    # --image-pull-policy=Always: pulled once at this coordinator's first sync of the
    # image on the node, present or not, so the registry checks the credentials; a
    # refusal then stands (and is retried as a pull) though the image is there.
    first_sync = settings.always_pull and record is None
    refused = settings.always_pull and record is not None and record.phase is OrderPhase.FAILED
    if present is not None and not stale and not first_sync and not refused:
        _repin(result, key, desire, present.pinned, obs)
        digest = present.digest_by_name.get(ref.name, "")
        return shared_pair(key, PairPhase.READY, "", "", 0, 0, digest, present.pinned)
    if record is not None and record.phase is OrderPhase.FAILED:
        # Refused with other credentials than the caches' Secrets give now: worth
        # another try, at once the first time, then with backoff (two caches with
        # different Secrets for one image must not take turns at the registry).
        new_credentials = (
            record.category == UNAUTHORIZED and record.credentials != desire.credentials
        )
        permanent = record.category in PERMANENT_CATEGORIES and not new_credentials
        retry_at = None if permanent else record.finished + backoff(record.failures, settings)
        if new_credentials and record.failures <= 1:
            retry_at = record.finished
        # A refresh retries every failure; an edit of a cache wanting the image (or a
        # cache made anew) those from before it.
        refresh_retry = (since is not None and record.finished < since) or (
            desire.edited is not None and record.finished < desire.edited
        )
        if not refresh_retry and (retry_at is None or now < retry_at):
            return PairState(
                key, PairPhase.FAILED, record.category, record.message, retry_at=retry_at
            )
    wave = desire.wave
    if wave is not None and not obs.slots.free(key, wave):
        result.queued[key] = wave
        return shared_pair(
            key, PairPhase.QUEUED, message=f"waiting for a wave slot (max {wave} nodes at once)"
        )
    always = stale or first_sync or refused
    # A refresh that moves the tag retires what it named before, unless another share
    # wants that content under another name (its digest, another tag).
    replace = (
        stale
        and present is not None
        and not any(
            desired.wanted(name) for name in (present.tags - {lookup_name(key)}) | present.digests
        )
    )
    result.pulls.append(
        PullItem(
            key,
            always=always,
            pin=desire.pin and obs.pinning_supported,
            replace=replace,
            caches=desire.caches,
        )
    )
    return shared_pair(key, PairPhase.PENDING, message="pull ordered")


def _repin(
    result: NodeResult, key: ImageKey, desire: Desire, pinned: bool, obs: NodeObservation
) -> None:
    if desire.pin and not pinned and obs.pinning_supported:
        result.pinning.add(key)  # re-pinned by _pins


def _pins(
    result: NodeResult,
    desired: NodeDesired,
    obs: NodeObservation,
    inventory: Inventory,
    held: Mapping[ImageKey, NodeImage | None],
) -> set[str]:
    """Pins to place and to lift; returns the ids of our pins that no share wants
    pinned (lifted now or as soon as the node is settled)."""
    keep: set[str] = set()
    removed: set[str] = set()  # a removal unpins too
    named: dict[str, ImageKey] = {}  # image id -> the first desired key naming it
    for key, desire in desired.items.items():
        present = held[key]
        if present is None:
            continue
        named.setdefault(present.image_id, key)
        if desire.want and desire.pin:
            keep.add(present.image_id)
        elif desire.remove and not desire.want and key not in obs.removal_errors:
            removed.add(present.image_id)
    for key in sorted(result.pinning):
        present = held[key]
        if present is not None and present.image_id not in obs.pins_in_flight:
            result.pins.append((key, True))
    unwanted = {i.image_id for i in inventory.images if i.pin_owned and i.image_id not in keep}
    if unwanted and not obs.settling:
        for image_id in sorted(unwanted - obs.pins_in_flight - removed):
            result.pins.append((named.get(image_id, image_id), False))
    return unwanted


def _release(
    result: NodeResult,
    key: ImageKey,
    desire: Desire,
    obs: NodeObservation,
    present: NodeImage | None,
    lifting: set[str],
    wanted: set[str],
) -> Release:
    """An image some share removes (or a deleted cache unpins): removed unless another
    share wants it (want beats remove), in which case only an unwanted pin goes.
    `wanted`: the ids of content some share wants under any name. Such content stays:
    only a tag of it goes, and only while another tag names it (the agent then takes
    that tag's record alone; with no other tag a runtime would take every name)."""
    error = obs.removal_errors.get(key)
    if error is not None and desire.remove:
        result.removal_errors[key] = error
        return Release.FAILED
    if present is None:
        # A pull still under way is cancelled (_cancels); one that lands all the same
        # (it ended as the cancel went out; an agent without CancelPulls) is removed.
        record = obs.pulls.get(key)
        landing = desire.remove and not desire.want and record is not None and record.in_flight
        return Release.BUSY if landing else Release.DONE
    if desire.want or not desire.remove:
        pin_busy = present.image_id in lifting or present.image_id in obs.pins_in_flight
        return Release.BUSY if pin_busy else Release.DONE
    if present.image_id in wanted and (ref_of(key).digest or not present.tags - {key}):
        return Release.DONE  # the content is wanted under another name: it stays
    if key not in obs.removals_in_flight:
        result.removals.append(key)
    return Release.BUSY
