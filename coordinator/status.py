"""From a cache's projection to the ImageCache status users read, and to the Events
worth sending.

Pure functions. The status keeps kube-fledged's fields and values (status, reason,
message, failures, startTime, completionTime) and adds ours beside them, bounded so a
cache over thousands of nodes still fits in one object. Of what it holds, only the
restart state (`appliedLists`, `removing`, `purgedGeneration`) is ever read back, by a
coordinator that has not seen the cache before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .api import CacheList, Message, Reason, Status, list_to_json
from .desired import CacheView, Removal
from .pairs import Counts, Tally
from .projection import CacheProjection

Spell = Callable[[str], str]  # an image's key -> as the cache spells it

MAX_FAILED_NODES_PER_IMAGE = 20
MAX_NODE_DETAILS = 50
MAX_IMAGE_EVENTS = 10  # Events per change of state naming one failed image each
# etcd refuses an object over 1.5 MiB (its default --max-request-bytes). The status's
# detail a person reads (per-node rows, failures, image summaries) gets half of what is
# left of that once the rest of the object and the status's essentials are counted
# (the failures' keys are listed again in managedFields), between these two bounds.
OBJECT_MAX_BYTES = 1_400_000
DETAIL_MAX_BYTES = 256 * 1024
DETAIL_MIN_BYTES = 8 * 1024
DETAIL_FIELDS = ("nodes", "failures", "images")
MAX_DETAIL_MESSAGE = 512  # characters of one failure's message once a status is trimmed

PROCESSING_MESSAGES = {
    Reason.CREATE: Message.PULLING,
    Reason.UPDATE: Message.UPDATING,
    Reason.REFRESH: Message.REFRESHING,
    Reason.PURGE: Message.PURGING,
    Reason.DELETE: Message.DELETING,
}


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


def operation(view: CacheView, previous: Mapping[str, Any]) -> str:
    """Why the cache is (or would be) processing, in kube-fledged's words."""
    if view.deleting:
        return Reason.DELETE
    if view.purge:
        return Reason.PURGE
    if view.refresh_since is not None:
        return Reason.REFRESH
    observed = previous.get("observedGeneration")
    if observed is None and not previous.get("startTime"):
        return Reason.CREATE
    if observed is not None and observed != view.generation:
        return Reason.UPDATE
    if (
        previous.get("status") == Status.PROCESSING
        and previous.get("reason") in PROCESSING_MESSAGES
    ):
        return str(previous["reason"])  # carry on (e.g. after a coordinator restart)
    # Nothing was edited: pulls retried after their backoff, a node that joined or came
    # back. Re-pulling what the spec already asked for is what kube-fledged calls a refresh.
    return Reason.REFRESH


def _failures(tally: Tally, spell: Spell) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for image in sorted(tally.failed, key=spell):
        count = len(tally.failed[image])
        entries = [
            {"node": node, "reason": p.reason or p.phase.value, "message": p.message}
            for node, p in tally.first_failures(image, MAX_FAILED_NODES_PER_IMAGE)
        ]
        if count > MAX_FAILED_NODES_PER_IMAGE:
            entries.append(
                {
                    "node": "",
                    "reason": "MoreFailures",
                    "message": f"and {count - MAX_FAILED_NODES_PER_IMAGE} more nodes",
                }
            )
        out[spell(image)] = entries
    return out


def _image_summary(tally: Tally, spell: Spell) -> list[dict[str, Any]]:
    out = []
    for image, counts in sorted(tally.images.items(), key=lambda item: spell(item[0])):
        entry: dict[str, Any] = {
            "image": spell(image),
            "nodesReady": counts.ready,
            "nodesTotal": counts.total,
        }
        if counts.digests:
            # the digest most nodes hold (the smallest on a tie, so it does not flap)
            entry["digest"] = min(counts.digests.items(), key=lambda d: (-d[1], d[0]))[0]
            if len(counts.digests) > 1:
                entry["digests"] = sorted(counts.digests)
        if counts.pulling:
            entry["bytesDone"] = counts.bytes_done
            entry["bytesTotal"] = counts.bytes_total
        out.append(entry)
    return out


def _node_details(tally: Tally, spell: Spell) -> list[dict[str, Any]]:
    """Nodes not yet done, most behind first, at most MAX_NODE_DETAILS of them."""
    return [plan.row(node, spell) for node, plan in tally.most_behind(MAX_NODE_DETAILS)]


def _condition(
    kind: str,
    true: bool,
    reason: str,
    message: str,
    view: CacheView,
    previous: Mapping[str, Any],
    now: str,
) -> dict[str, Any]:
    status = "True" if true else "False"
    old = next((c for c in previous.get("conditions") or () if c.get("type") == kind), None)
    changed = old is None or old.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": view.generation,
        "lastTransitionTime": now if changed or old is None else old.get("lastTransitionTime", now),
    }


def _outcome(
    view: CacheView,
    tally: Tally,
    failures: Mapping[str, Any],
    unmatched: Sequence[CacheList],
) -> tuple[str, str, str]:
    """Status, reason and message of a cache whose work is done."""
    if view.purge or view.dormant:
        if failures:
            return Status.FAILED, Reason.DELETE_FAILED_FOR_SOME_IMAGES, Message.DELETE_FAILED
        return Status.SUCCEEDED, Reason.DELETED, Message.DELETED
    if failures:
        if any(c.failed >= c.total for c in tally.images.values() if c.failed):
            return Status.FAILED, Reason.FAILED_FOR_SOME_IMAGES, Message.FAILED_FOR_SOME_IMAGES
        return Status.FAILED, Reason.FAILED_ON_SOME_NODES, Message.FAILED_ON_SOME_NODES
    if unmatched:
        message = "; ".join(
            f"nodeSelector {cl.selector_text()} matches no node" for cl in unmatched
        )
        return Status.FAILED, Reason.NO_MATCHING_NODES, message
    return Status.SUCCEEDED, Reason.PULLED, Message.PULLED


def next_purged_generation(view: CacheView, purge_done: bool) -> int | None:
    """The generation a purge emptied the cache at, kept until an edit or a refresh."""
    purged = view.purged_generation
    if view.purge and purge_done:
        return view.generation
    if view.refresh_since is not None or (purged is not None and purged != view.generation):
        return None
    return purged


def restart_state(view: CacheView, removing: Sequence[Removal], purge_done: bool) -> dict[str, Any]:
    """What a coordinator taking over reads back: the lists acted on, the removals
    still open, the generation purged at."""
    lists = view.spec.lists if view.spec is not None else view.applied
    out: dict[str, Any] = {"appliedLists": [list_to_json(cl) for cl in lists]}
    if removing:
        out["removing"] = [
            {"image": image, "nodeSelector": dict(sel)} if sel else {"image": image}
            for image, sel in removing
        ]
    purged = next_purged_generation(view, purge_done)
    if purged is not None:
        out["purgedGeneration"] = purged
    return out


def build_status(
    view: CacheView,
    projection: CacheProjection,
    previous: Mapping[str, Any],
    now: str,
    spec_error: str = "",
    secret_errors: Sequence[str] = (),
    unmatched: Sequence[CacheList] = (),
    removing: Sequence[Removal] = (),
    spell: Spell = str,
) -> dict[str, Any]:
    tally = projection.tally
    failures = _failures(tally, spell)
    op = operation(view, previous)
    processing = not spec_error and not projection.settled
    if spec_error:
        status, reason, message = Status.FAILED, Reason.SPEC_INVALID, spec_error
    elif processing:
        status, reason, message = Status.PROCESSING, op, PROCESSING_MESSAGES[op]
    else:
        status, reason, message = _outcome(view, tally, failures, unmatched)
    if secret_errors and not spec_error and not processing:
        status, reason, message = (
            Status.FAILED,
            Reason.PULL_SECRET_INVALID,
            "; ".join(secret_errors),
        )
    was_processing = previous.get("status") == Status.PROCESSING
    if processing:
        start = previous.get("startTime") if was_processing else now
    else:
        start = previous.get("startTime") or now
    summary = _image_summary(tally, spell)
    out: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "message": message,
        "startTime": start,
        "observedGeneration": view.generation,
        "ready": f"{tally.ready}/{tally.pairs}",
        "imagesReady": f"{sum(i['nodesReady'] == i['nodesTotal'] for i in summary)}/{len(summary)}",
        "images": summary,
        "conditions": [
            _condition("Ready", status == Status.SUCCEEDED, reason, message, view, previous, now),
            _condition(
                "Progressing",
                processing,
                op if processing else reason,
                PROCESSING_MESSAGES[op] if processing else message,
                view,
                previous,
                now,
            ),
        ],
    }
    if secret_errors:
        out["pullSecretErrors"] = list(secret_errors)
    if failures:
        out["failures"] = failures
    nodes = _node_details(tally, spell)
    if nodes:
        out["nodes"] = nodes
    if not processing:
        out["completionTime"] = (
            previous.get("completionTime")
            if not was_processing and previous.get("completionTime")
            else now
        )
    out.update(restart_state(view, removing, projection.purge_done))
    return out


def comparable(status: Mapping[str, Any]) -> dict[str, Any]:
    """The status without times, to tell a real change from a rewrite."""
    out = {k: v for k, v in status.items() if k not in ("startTime", "completionTime")}
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"}
        for c in status.get("conditions") or ()
    ]
    return out


def events_for(
    previous: Mapping[str, Any], new: Mapping[str, Any], counts: Counts
) -> list[EventSpec]:
    """Events on a change of state, aggregated per image (never one per node)."""
    before = (previous.get("status"), previous.get("reason"))
    after = (new.get("status"), new.get("reason"))
    if before == after:
        return []
    status, reason = after
    nodes, images = counts.nodes, counts.images
    if status == Status.PROCESSING:
        return [
            EventSpec("Normal", str(reason), f"{new['message']} ({images} images, {nodes} nodes)")
        ]
    if status == Status.SUCCEEDED:
        return [EventSpec("Normal", str(reason), f"{new['message']} ({new.get('ready', '')})")]
    events = [EventSpec("Warning", str(reason), str(new.get("message", "")))]
    shown = sorted((new.get("failures") or {}).items())[:MAX_IMAGE_EVENTS]
    more = len(counts.failed) - len(shown)
    if more > 0:
        events.append(
            EventSpec(
                "Warning",
                "ImagePullFailed",
                f"{more} more images failed besides those in their own Events; see the status",
            )
        )
    for image, failed in shown:
        first = failed[0]
        count = counts.failed.get(image, len(failed))
        events.append(
            EventSpec(
                "Warning",
                "ImagePullFailed",
                f"{image}: failed on {count} of {counts.totals.get(image, count)} nodes; "
                f"{first['node']}: {first['reason']}: {first['message']}"[:1000],
            )
        )
    return events


def json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def status_room(obj: Mapping[str, Any]) -> int:
    """Bytes left for the status once the rest of `obj` is counted."""
    return OBJECT_MAX_BYTES - json_size({k: v for k, v in obj.items() if k != "status"})


def fit_status(status: dict[str, Any], room: int) -> dict[str, Any]:
    """`status` cut down to fit in `room` bytes, saying what it left out under `omitted`.

    What is acted on (state, reason, conditions, appliedLists, removing) is kept whole,
    so a spec too large for its object still fails to write (and is reported so). The
    detail a person reads is cut, the most expendable first: per-node rows, then each
    image's failures after the first, then whole images' failures and summaries (kept
    in order, so the first ones stay readable)."""
    essentials = json_size({k: v for k, v in status.items() if k not in DETAIL_FIELDS})
    detail = min(DETAIL_MAX_BYTES, (room - essentials) // 2)
    budget = essentials + max(DETAIL_MIN_BYTES, detail)
    if json_size(status) <= budget:
        return status
    out = dict(status)
    omitted: dict[str, int] = {}
    out["omitted"] = omitted
    if "nodes" in out:
        omitted["nodes"] = len(out.pop("nodes"))
    failures: dict[str, list[dict[str, str]]] = out.get("failures") or {}
    if failures and json_size(out) > budget:
        cut = sum(len(entries) - 1 for entries in failures.values())
        out["failures"] = failures = {
            image: [_short(entries[0])] for image, entries in failures.items() if entries
        }
        if cut:
            omitted["failureEntries"] = cut
    summary: list[dict[str, Any]] = out.get("images") or []
    if failures and json_size(out) > budget:
        # Failures and image summaries share what is left, failures first but at most
        # half of it while there are summaries to show.
        rest = budget - json_size({**out, "failures": {}, "images": []})
        share = rest // 2 if summary else rest
        images = sorted(failures)
        keep = _longest_fit(
            len(images),
            lambda n: {**out, "images": [], "failures": {i: failures[i] for i in images[:n]}},
            budget - (rest - share),
        )
        if keep < len(images):
            out["failures"] = {i: failures[i] for i in images[:keep]}
            omitted["failedImages"] = len(images) - keep
    if summary and json_size(out) > budget:
        keep = _longest_fit(len(summary), lambda n: {**out, "images": summary[:n]}, budget)
        out["images"] = summary[:keep]
        omitted["images"] = len(summary) - keep
    if json_size(out) > budget:  # a long message (many selectors or Secret errors)
        out["message"] = _cut(str(out.get("message", "")))
        out["conditions"] = [
            {**c, "message": _cut(c.get("message", ""))} for c in out["conditions"]
        ]
    return out


def _cut(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_MESSAGE else text[:MAX_DETAIL_MESSAGE] + "..."


def _short(entry: Mapping[str, str]) -> dict[str, str]:
    return {**entry, "message": _cut(entry.get("message", ""))}


def _longest_fit(count: int, build: Callable[[int], Any], budget: int) -> int:
    """The largest n in [0, count] whose build(n) fits in `budget` (binary search)."""
    low, high = 0, count
    while low < high:
        mid = (low + high + 1) // 2
        if json_size(build(mid)) <= budget:
            low = mid
        else:
            high = mid - 1
    return low
