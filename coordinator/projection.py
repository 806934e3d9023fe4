"""A cache's status as a projection of its nodes' results: running sums kept node by
node (`pairs.Tally`), and what its removals, purge or deletion still wait for. Plain
data; the controller puts each node's result here, the status is written from it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .api import Reason
from .desired import Removal, Share
from .images import ImageKey
from .pairs import NodePlan, PairPhase, PairState, Tally, shared_pair
from .plan import NodeResult, Release


class CacheProjection:
    def __init__(self) -> None:
        self.tally = Tally()
        self.pending: set[str] = set()  # nodes whose share changed and that wait to be planned
        self.removing: dict[Removal, set[str]] = {}  # open removal -> nodes still busy
        self.unpinning: set[str] = set()  # deletion: nodes still lifting our pins
        self.purging: set[str] = set()
        self.ordering: set[str] = set()  # nodes sent orders for our images this round

    def share_changed(self, node: str, share: Share | None) -> None:
        if share is None:
            self.drop(node)
        else:
            self.pending.add(node)

    def drop(self, node: str) -> None:
        self.pending.discard(node)
        self.tally.put(node, None)
        for nodes in self.removing.values():
            nodes.discard(node)
        for busy in (self.unpinning, self.purging, self.ordering):
            busy.discard(node)

    def put(self, node: str, share: Share, result: NodeResult) -> None:
        """The node's result, seen through this cache's share of it."""
        self.pending.discard(node)
        if share.purges:
            self.tally.put(node, NodePlan.of(_purged(node, share.purges, result)))
        else:
            pairs = (result.pairs[key] for key, _ in share.wants)
            self.tally.put(node, NodePlan.of(pairs, result.unknown) if share.wants else None)
        removes = {entry: key for key, entry in share.removes}
        for entry, busy in self.removing.items():
            if entry not in removes:  # wanted again here, or the node left its selector
                busy.discard(node)
        for entry, key in removes.items():
            busy = self.removing.setdefault(entry, set())
            if result.released.get(key) is Release.BUSY:
                busy.add(node)
            else:
                busy.discard(node)
        _mark(self.unpinning, node, _busy(result, share.unpins))
        _mark(self.purging, node, _busy(result, share.purges))
        _mark(self.ordering, node, any(key in result.pinning for key, _ in share.wants))

    @property
    def settled(self) -> bool:
        """Nothing in flight or left to order for this cache."""
        return (
            not self.pending
            and not self.ordering
            and not self.open_removals()
            and self.tally.open == 0
        )

    def open_removals(self, entries: Iterable[Removal] = ()) -> tuple[Removal, ...]:
        """Of `entries` (and those known here), the removals not yet done everywhere;
        while nodes wait to be planned, any of them may be."""
        known = set(entries) | set(self.removing)
        if self.pending:
            return tuple(sorted(known))
        return tuple(sorted(e for e in known if self.removing.get(e)))

    @property
    def purge_done(self) -> bool:
        return not self.pending and not self.purging

    @property
    def finalize_done(self) -> bool:
        return not self.pending and not self.unpinning

    def close_removals(self, still_open: Iterable[Removal]) -> None:
        keep = set(still_open)
        for entry in [e for e in self.removing if e not in keep]:
            del self.removing[entry]

    @classmethod
    def of_pairs(cls, pairs: Iterable[tuple[str, PairState]]) -> CacheProjection:
        projection = cls()
        projection.tally = Tally.of_pairs(pairs)
        return projection


def _busy(result: NodeResult, keys: Iterable[ImageKey]) -> bool:
    return any(result.released.get(k) is Release.BUSY for k in keys)


def _mark(nodes: set[str], node: str, busy: bool) -> None:
    if busy:
        nodes.add(node)
    else:
        nodes.discard(node)


def _purged(node: str, keys: Iterable[ImageKey], result: NodeResult) -> list[PairState]:
    phases: Mapping[Release, PairPhase] = {
        Release.DONE: PairPhase.REMOVED,
        Release.BUSY: PairPhase.REMOVING,
    }
    out = []
    for key in keys:
        state = result.released.get(key, Release.DONE)
        if state is Release.AWAY:
            out.append(shared_pair(key, PairPhase.AGENT_UNAVAILABLE, Reason.AGENT_UNAVAILABLE))
        elif state is Release.FAILED:
            message = result.removal_errors.get(key, "")
            out.append(PairState(key, PairPhase.FAILED, "RemoveFailed", message))
        else:
            out.append(shared_pair(key, phases[state]))
    return out
