"""Node readiness gating, as decisions over plain data: whether a node that joined with
the startup taint may take pods now.

A node registers with the taint (the kubelet's --register-with-taints, a node pool's
settings, Karpenter's startupTaints); pods that do not tolerate it wait. The taint goes
once every image the live ImageCaches select for the node is there (pinned where
asked), or once only images that failed for good are missing (NotFound, Unauthorized,
an invalid reference: waiting cannot bring them), or at the node's deadline, counted
from its creation, so a broken registry never keeps a node out of service for good.
Only the configured taint key is ever touched, and only removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .images import ImageKey
from .model import PERMANENT_CATEGORIES, Inventory, OrderPhase, PullRecord


class Verdict(StrEnum):
    HOLD = "Hold"
    READY = "Ready"  # every selected image is there
    FAILED = "Failed"  # what is missing failed for good
    DEADLINE = "Deadline"  # the node's time ran out


@dataclass(frozen=True)
class Wanted:
    """An image the live caches select for the node; `pin` if any of them pins it."""

    image: str  # as a cache spells it (for Events)
    key: ImageKey
    pin: bool
    caches: tuple[str, ...]  # namespace/name of the caches that select it


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    missing: tuple[str, ...] = ()  # images not there (or not pinned where asked)
    failed: tuple[str, ...] = ()  # of those, the ones that failed for good
    wait: float = 0.0  # seconds to the deadline, when holding

    @property
    def release(self) -> bool:
        return self.verdict is not Verdict.HOLD


def has_taint(taints: Iterable[Mapping[str, Any]], key: str) -> bool:
    return any(t.get("key") == key for t in taints)


def without_taint(taints: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    """The node's taints but ours (every effect of our key): nothing else is touched."""
    return [t for t in taints if t.get("key") != key]


def decide(
    wanted: Sequence[Wanted],
    held: Inventory | None,
    pinning_supported: bool,
    pulls: Mapping[ImageKey, PullRecord],
    created: float,
    now: float,
    deadline: float,
) -> Decision:
    """`held`: the node's listing by its current agent (None until listed); `pulls`:
    the latest pull record per image; `created`: the Node's creation."""
    missing = []
    failed = []
    for want in wanted:
        present = held.lookup(want.key) if held is not None else None
        pinned_enough = not want.pin or not pinning_supported
        if present is not None and (pinned_enough or present.pinned):
            continue
        missing.append(want.image)
        record = pulls.get(want.key)
        if (
            record is not None
            and record.phase is OrderPhase.FAILED
            and record.category in PERMANENT_CATEGORIES
        ):
            failed.append(want.image)
    if not missing:  # with nothing selected, not even a listing is needed
        return Decision(Verdict.READY)
    left = created + deadline - now
    if held is not None and len(failed) == len(missing):
        return Decision(Verdict.FAILED, tuple(missing), tuple(failed))
    if left <= 0:
        return Decision(Verdict.DEADLINE, tuple(missing), tuple(failed))
    return Decision(Verdict.HOLD, tuple(missing), tuple(failed), wait=left)


def message(decision: Decision, deadline_text: str) -> str:
    """The Event's words for a release."""
    if decision.verdict is Verdict.READY:
        return "every image the ImageCaches select for this node is present; taint removed"
    listed = ", ".join(decision.missing[:10])
    more = f" and {len(decision.missing) - 10} more" if len(decision.missing) > 10 else ""
    if decision.verdict is Verdict.FAILED:
        return f"taint removed: the missing images failed and will not arrive: {listed}{more}"
    return f"taint removed after {deadline_text} with images missing: {listed}{more}"
