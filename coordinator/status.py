"""From a plan to the ImageCache status users read, and to the Events worth sending.

Pure functions. The status keeps kube-fledged's fields and values (status, reason,
message, failures, startTime, completionTime) and adds ours beside them, bounded so a
cache over thousands of nodes still fits in one object.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .api import Message, Reason, Status, list_to_json
from .plan import CacheView, PairPhase, PairState, Plan

MAX_FAILED_NODES_PER_IMAGE = 20
MAX_NODE_DETAILS = 50
FAILED_PHASES = frozenset({PairPhase.FAILED, PairPhase.AGENT_UNAVAILABLE})

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
    return Reason.UPDATE


def _per_image(pairs: Sequence[PairState]) -> tuple[Counter[str], Counter[str]]:
    """Nodes wanted and nodes failed, per image (from every pair, not the capped list)."""
    totals = Counter(p.image for p in pairs)
    failed = Counter(p.image for p in pairs if p.phase in FAILED_PHASES)
    return totals, failed


def _failures(pairs: Sequence[PairState]) -> dict[str, list[dict[str, str]]]:
    by_image: dict[str, list[PairState]] = defaultdict(list)
    for p in pairs:
        if p.phase in FAILED_PHASES:
            by_image[p.image].append(p)
    out: dict[str, list[dict[str, str]]] = {}
    for image, failed in sorted(by_image.items()):
        entries = [
            {"node": p.node, "reason": p.reason or p.phase.value, "message": p.message}
            for p in failed[:MAX_FAILED_NODES_PER_IMAGE]
        ]
        if len(failed) > MAX_FAILED_NODES_PER_IMAGE:
            entries.append(
                {
                    "node": "",
                    "reason": "MoreFailures",
                    "message": f"and {len(failed) - MAX_FAILED_NODES_PER_IMAGE} more nodes",
                }
            )
        out[image] = entries
    return out


def _image_summary(pairs: Sequence[PairState]) -> list[dict[str, Any]]:
    by_image: dict[str, list[PairState]] = defaultdict(list)
    for p in pairs:
        by_image[p.image].append(p)
    out = []
    for image, states in sorted(by_image.items()):
        ready = [p for p in states if p.phase == PairPhase.READY]
        digests = Counter(p.digest for p in ready if p.digest)
        entry: dict[str, Any] = {
            "image": image,
            "nodesReady": len(ready),
            "nodesTotal": len(states),
        }
        if digests:
            entry["digest"] = digests.most_common(1)[0][0]
            if len(digests) > 1:
                entry["digests"] = sorted(digests)
        pulling = [p for p in states if p.phase == PairPhase.PULLING]
        if pulling:
            entry["bytesDone"] = sum(p.bytes_done for p in pulling)
            entry["bytesTotal"] = sum(p.bytes_total for p in pulling)
        out.append(entry)
    return out


def _node_details(pairs: Sequence[PairState]) -> list[dict[str, Any]]:
    """Nodes not yet done, most behind first, at most MAX_NODE_DETAILS of them."""
    by_node: dict[str, list[PairState]] = defaultdict(list)
    for p in pairs:
        by_node[p.node].append(p)
    rows = []
    for node, states in by_node.items():
        ready = sum(p.phase == PairPhase.READY for p in states)
        if ready == len(states):
            continue
        row: dict[str, Any] = {"node": node, "ready": ready, "total": len(states)}
        active = [p for p in states if p.phase in (PairPhase.PULLING, PairPhase.WAITING)]
        if active:
            row["pulling"] = [p.image for p in active]
            row["bytesDone"] = sum(p.bytes_done for p in active)
            row["bytesTotal"] = sum(p.bytes_total for p in active)
        rows.append(row)
    rows.sort(key=lambda r: (r["ready"] / r["total"], r["node"]))
    return rows[:MAX_NODE_DETAILS]


def _condition(
    kind: str,
    true: bool,
    reason: str,
    message: str,
    generation: int,
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
        "observedGeneration": generation,
        "lastTransitionTime": now if changed or old is None else old.get("lastTransitionTime", now),
    }


def build_status(
    view: CacheView,
    plan: Plan,
    previous: Mapping[str, Any],
    now: str,
    spec_error: str = "",
    secret_errors: Sequence[str] = (),
) -> dict[str, Any]:
    pairs = plan.pairs
    failures = _failures(pairs)
    op = operation(view, previous)
    processing = not spec_error and not plan.settled
    if spec_error:
        status, reason, message = Status.FAILED, Reason.SPEC_INVALID, spec_error
    elif processing:
        status, reason, message = Status.PROCESSING, op, PROCESSING_MESSAGES[op]
    elif view.purge or view.dormant:
        status, reason, message = Status.SUCCEEDED, Reason.DELETED, Message.DELETED
        if failures:
            status, reason, message = (
                Status.FAILED,
                Reason.DELETE_FAILED_FOR_SOME_IMAGES,
                Message.DELETE_FAILED,
            )
    elif failures:
        totals, failed = _per_image(pairs)
        all_failed = any(count >= totals[image] for image, count in failed.items())
        if all_failed:
            status, reason, message = (
                Status.FAILED,
                Reason.FAILED_FOR_SOME_IMAGES,
                Message.FAILED_FOR_SOME_IMAGES,
            )
        else:
            status, reason, message = (
                Status.FAILED,
                Reason.FAILED_ON_SOME_NODES,
                Message.FAILED_ON_SOME_NODES,
            )
    elif plan.unmatched:
        status, reason = Status.FAILED, Reason.NO_MATCHING_NODES
        message = "; ".join(
            f"nodeSelector {cl.selector_text()} matches no node" for cl in plan.unmatched
        )
    else:
        status, reason, message = Status.SUCCEEDED, Reason.PULLED, Message.PULLED
    if secret_errors and not spec_error:
        detail = "; ".join(secret_errors)
        if not processing:
            status, reason = Status.FAILED, Reason.PULL_SECRET_INVALID
            message = detail
    was_processing = previous.get("status") == Status.PROCESSING
    if processing:
        start = previous.get("startTime") if was_processing else now
    else:
        start = previous.get("startTime") or now
    ready = sum(p.phase == PairPhase.READY for p in pairs)
    summary = _image_summary(pairs)
    out: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "message": message,
        "startTime": start,
        "observedGeneration": view.generation,
        "ready": f"{ready}/{len(pairs)}",
        "imagesReady": f"{sum(i['nodesReady'] == i['nodesTotal'] for i in summary)}/{len(summary)}",
        "images": summary,
        "conditions": [
            _condition(
                "Ready", status == Status.SUCCEEDED, reason, message, view.generation, previous, now
            ),
            _condition(
                "Progressing",
                processing,
                op if processing else reason,
                PROCESSING_MESSAGES[op] if processing else message,
                view.generation,
                previous,
                now,
            ),
        ],
    }
    if secret_errors:
        out["pullSecretErrors"] = list(secret_errors)
    if failures:
        out["failures"] = failures
    nodes = _node_details(pairs)
    if nodes:
        out["nodes"] = nodes
    if not processing:
        out["completionTime"] = (
            previous.get("completionTime")
            if not was_processing and previous.get("completionTime")
            else now
        )
    if view.spec is not None:
        out["appliedLists"] = [list_to_json(cl) for cl in view.spec.lists]
    else:
        out["appliedLists"] = [list_to_json(cl) for cl in view.applied]
    if plan.removing:
        out["removing"] = [
            {"image": image, "nodeSelector": dict(sel)} if sel else {"image": image}
            for image, sel in plan.removing
        ]
    purged = previous.get("purgedGeneration")
    if view.purge and plan.purge_done:
        purged = view.generation
    elif view.refresh_since is not None or (purged is not None and purged != view.generation):
        purged = None
    if purged is not None:
        out["purgedGeneration"] = purged
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
    previous: Mapping[str, Any], new: Mapping[str, Any], pairs: Sequence[PairState]
) -> list[EventSpec]:
    """Events on a change of state, aggregated per image (never one per node)."""
    before = (previous.get("status"), previous.get("reason"))
    after = (new.get("status"), new.get("reason"))
    if before == after:
        return []
    status, reason = after
    nodes = len({p.node for p in pairs})
    images = len({p.image for p in pairs})
    if status == Status.PROCESSING:
        return [
            EventSpec("Normal", str(reason), f"{new['message']} ({images} images, {nodes} nodes)")
        ]
    if status == Status.SUCCEEDED:
        return [EventSpec("Normal", str(reason), f"{new['message']} ({new.get('ready', '')})")]
    events = [EventSpec("Warning", str(reason), str(new.get("message", "")))]
    totals, counts = _per_image(pairs)
    for image, failed in sorted((new.get("failures") or {}).items()):
        first = failed[0]
        count = counts.get(image, len(failed))
        events.append(
            EventSpec(
                "Warning",
                "ImagePullFailed",
                f"{image}: failed on {count} of {totals.get(image, count)} nodes; "
                f"{first['node']}: {first['reason']}: {first['message']}"[:1000],
            )
        )
    return events
