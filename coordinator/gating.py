"""Node readiness gating's moving parts: which Nodes wait behind the startup taint, the
decision for each (coordinator/gate.py), the taint's removal and its Events.

The controller tells it of Node changes and of what may change a decision (a node's
observation, a cache's spec); it queues the gated node, and one worker asks `check`
and `release` here. Nodes without the taint never get here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from .api import GATE_RELEASED_ANNOTATION
from .gate import Decision, Verdict, Wanted, decide, has_taint, message
from .kube import KubeWriter, Obj, now_iso
from .model import NodeObservation

log = logging.getLogger(__name__)

EVENT_REASONS = {
    Verdict.READY: "CacheGateReleased",
    Verdict.FAILED: "CacheGateFailed",
    Verdict.DEADLINE: "CacheGateDeadline",
}


def created_at(obj: Mapping[str, Any]) -> float:
    """The Node's creation, epoch seconds (now if the apiserver gave none)."""
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return time.time()
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


class NodeGate:
    def __init__(
        self,
        kube: KubeWriter,
        taint: str,
        deadline: float,
        deadline_text: str,
        wanted: Callable[[str], list[Wanted]],
        observation: Callable[[str], NodeObservation | None],
        cache: Callable[[str], Obj | None],
    ) -> None:
        """`wanted(node)`: what the live caches select for it; `cache(key)`: a cache's
        object from the store (for its Events)."""
        self._kube = kube
        self.taint = taint
        self._deadline = deadline
        self._deadline_text = deadline_text
        self._wanted = wanted
        self._observation = observation
        self._cache = cache
        self.gated: dict[str, tuple[float, str]] = {}  # node -> its creation time, uid
        # Released by this process (node -> the Node's uid): counted at once, not when
        # the Node's annotation comes back through the watch (a status written between
        # would count it nowhere).
        self.released: dict[str, str] = {}

    def saw_node(self, name: str, obj: Obj | None) -> bool:
        """A Node appeared, changed or went: whether it waits behind the taint now."""
        taints = ((obj or {}).get("spec") or {}).get("taints") or []
        uid = str(((obj or {}).get("metadata") or {}).get("uid") or "")
        if obj is None or self.released.get(name, uid) != uid:
            # Gone, or made anew under its name (a relist after a broken watch shows a
            # delete and re-create as one update): it starts over.
            self.released.pop(name, None)
        # A node released here is not gated again: a watch event of a version from
        # before our patch (the kubelet writes its Node status all the time) still shows
        # the taint. The gate is for a node's start; a Node made anew starts over.
        if obj is None or name in self.released or not has_taint(taints, self.taint):
            self.gated.pop(name, None)
            return False
        self.gated[name] = (created_at(obj), uid)
        return True

    def check(self, name: str, now: float) -> Decision | None:
        """None for a node that does not wait (any more)."""
        gated = self.gated.get(name)
        if gated is None:
            return None
        created = gated[0]
        obs = self._observation(name)
        return decide(
            self._wanted(name),
            obs.inventory if obs is not None else None,
            obs.pinning_supported if obs is not None else True,
            obs.pulls if obs is not None else {},
            created,
            now,
            self._deadline,
        )

    async def release(self, name: str, decision: Decision) -> None:
        """Removes the taint (our key only) and says why, on the Node and, for a release
        with images missing, on each cache that selects them there."""
        annotation = (GATE_RELEASED_ANNOTATION, f"{decision.verdict.value} at {now_iso()}")
        gated = self.gated.get(name)
        if gated is None:
            return
        uid = gated[1]
        node = await asyncio.to_thread(self._kube.release_node, name, uid, self.taint, annotation)
        if self.gated.get(name) == gated:
            del self.gated[name]
        if node is None:
            return  # gone or made anew, or someone else removed the taint first
        self.released[name] = uid
        text = message(decision, self._deadline_text)
        reason = EVENT_REASONS[decision.verdict]
        kind = "Normal" if decision.verdict is Verdict.READY else "Warning"
        log.info("node %s released from the gate (%s): %s", name, decision.verdict.value, text)
        await asyncio.to_thread(self._kube.event, node, kind, reason, text)
        for key in self._caches_missing(name, decision.missing):
            cache = self._cache(key)
            if cache is not None:
                await asyncio.to_thread(
                    self._kube.event, cache, "Warning", reason, f"node {name}: {text}"
                )

    def _caches_missing(self, node: str, missing: Iterable[str]) -> list[str]:
        gone = set(missing)
        keys = {k for w in self._wanted(node) if w.image in gone for k in w.caches}
        return sorted(keys)

    def counts(self, nodes: Iterable[str], store: Mapping[str, Obj]) -> tuple[int, int]:
        """Of `nodes` (a cache's), how many wait behind the gate and how many it released."""
        gated = released = 0
        for node in nodes:
            if node in self.gated:
                gated += 1
            elif node in self.released or GATE_RELEASED_ANNOTATION in (
                (store.get(node) or {}).get("metadata", {}).get("annotations") or {}
            ):
                released += 1
        return gated, released
