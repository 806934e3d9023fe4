"""Node readiness gating's decisions, as plain functions."""

from __future__ import annotations

from coordinator.gate import (
    Decision,
    Verdict,
    Wanted,
    decide,
    has_taint,
    message,
    without_taint,
)
from coordinator.gating import NodeGate
from coordinator.images import image_key
from coordinator.model import Inventory, NodeImage, OrderPhase, PullRecord

NOW = 1_000_000.0
A = "reg.io/app/a:v1"
B = "reg.io/app/b:v1"
DEADLINE = 600.0


def held(*images: tuple[str, bool]) -> Inventory:
    return Inventory(
        [
            NodeImage(f"sha256:{ref}", frozenset({image_key(ref)}), frozenset(), pinned, pinned, 1)
            for ref, pinned in images
        ],
        NOW,
    )


def want(image: str, pin: bool = True) -> Wanted:
    return Wanted(image, image_key(image), pin, ("ns/c",))


def test_a_node_is_released_once_every_selected_image_is_there_pinned_where_asked() -> None:
    wanted = [want(A), want(B, pin=False)]
    unpinned = decide(wanted, held((A, False), (B, False)), True, {}, NOW - 60, NOW, DEADLINE)
    assert unpinned.verdict is Verdict.HOLD
    assert unpinned.missing == (A,)  # there, but not pinned yet
    assert unpinned.wait == DEADLINE - 60
    done = decide(wanted, held((A, True), (B, False)), True, {}, NOW - 60, NOW, DEADLINE)
    assert done.verdict is Verdict.READY
    assert done.release
    # A runtime that cannot pin (CRI-O, Docker): present is enough.
    assert decide(wanted, held((A, False), (B, False)), False, {}, NOW, NOW, DEADLINE).release


def test_a_node_waits_for_its_listing_unless_nothing_selects_it() -> None:
    assert decide([want(A)], None, True, {}, NOW, NOW, DEADLINE).verdict is Verdict.HOLD
    assert decide([], None, True, {}, NOW, NOW, DEADLINE).verdict is Verdict.READY


def test_the_deadline_releases_a_node_whose_images_do_not_come() -> None:
    unavailable = {
        image_key(A): PullRecord(OrderPhase.FAILED, finished=NOW, category="RegistryUnavailable")
    }
    before = decide([want(A)], held(), True, unavailable, NOW - 599, NOW, DEADLINE)
    assert before.verdict is Verdict.HOLD
    assert before.wait == 1
    after = decide([want(A)], held(), True, unavailable, NOW - 600, NOW, DEADLINE)
    assert after.verdict is Verdict.DEADLINE
    assert after.missing == (A,)
    assert after.failed == ()
    assert "after 10m" in message(after, "10m")
    assert A in message(after, "10m")
    unlisted = decide([want(A)], None, True, {}, NOW - 601, NOW, DEADLINE)
    assert unlisted.verdict is Verdict.DEADLINE


def test_images_that_failed_for_good_do_not_hold_a_node() -> None:
    gone = {
        image_key(A): PullRecord(OrderPhase.FAILED, finished=NOW, category="NotFound"),
        image_key(B): PullRecord(OrderPhase.FAILED, finished=NOW, category="RegistryUnavailable"),
    }
    only_gone = decide([want(A)], held(), True, gone, NOW, NOW, DEADLINE)
    assert only_gone.verdict is Verdict.FAILED
    assert only_gone.failed == (A,)
    assert "will not arrive" in message(only_gone, "10m")
    # One that may still come holds the node (until the deadline).
    both = decide([want(A), want(B)], held(), True, gone, NOW, NOW, DEADLINE)
    assert both.verdict is Verdict.HOLD
    assert both.failed == (A,)


def test_only_the_configured_taint_key_is_removed() -> None:
    taints = [
        {"key": "kubefledged.io/caching", "effect": "NoSchedule"},
        {"key": "kubefledged.io/caching", "effect": "NoExecute"},
        {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
    ]
    assert has_taint(taints, "kubefledged.io/caching")
    assert without_taint(taints, "kubefledged.io/caching") == [taints[2]]
    assert not has_taint(taints[2:], "kubefledged.io/caching")


class Writer:
    """The Node API as the gate sees it: the taint goes, the Node was as given (the
    Node by that name now has uid `current`)."""

    def __init__(self, current: str = "") -> None:
        self.current = current

    def release_node(
        self, name: str, uid: str, taint: str, annotation: tuple[str, str]
    ) -> dict[str, object] | None:
        if self.current and uid != self.current:
            return None  # as the real one does: not the Node the decision was about
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": uid}}

    def event(self, *args: object) -> None:
        return None


async def test_a_released_node_counts_as_released_before_the_watch_shows_its_annotation() -> None:
    """A status written between the release and the Node's watch event counted the node
    neither gated nor released (a user saw nodesReleased 0 on a Ready cache)."""
    gate = NodeGate(Writer(), "t", DEADLINE, "10m", lambda n: [], lambda n: None, lambda k: None)  # type: ignore[arg-type]
    tainted = {
        "metadata": {"name": "n1"},
        "spec": {"taints": [{"key": "t", "effect": "NoSchedule"}]},
    }
    assert gate.saw_node("n1", tainted)
    assert gate.counts(["n1"], {"n1": tainted}) == (1, 0)
    await gate.release("n1", Decision(Verdict.READY))
    assert gate.counts(["n1"], {"n1": tainted}) == (0, 1)  # the store still has the old Node
    assert not gate.saw_node("n1", tainted)  # a version from before the release, late
    assert gate.counts(["n1"], {"n1": tainted}) == (0, 1)
    gate.saw_node("n1", None)  # the Node is deleted
    assert gate.counts(["n1"], {}) == (0, 0)


def _tainted(uid: str) -> dict[str, object]:
    return {
        "metadata": {"name": "n1", "uid": uid},
        "spec": {"taints": [{"key": "t", "effect": "NoSchedule"}]},
    }


async def test_a_node_made_anew_under_a_released_name_is_gated_again() -> None:
    """A Node deleted and made again under its name (clouds reuse names: AWS names nodes
    by private IP) inside a broken watch shows as an update of the old one: it was taken
    for released and kept its taint for good, with no deadline either."""
    gate = NodeGate(Writer(), "t", DEADLINE, "10m", lambda n: [], lambda n: None, lambda k: None)  # type: ignore[arg-type]
    assert gate.saw_node("n1", _tainted("old"))
    await gate.release("n1", Decision(Verdict.READY))
    assert not gate.saw_node("n1", _tainted("old"))  # late event of the released one
    assert gate.saw_node("n1", _tainted("new"))  # the new machine waits for its images
    assert gate.check("n1", 0.0) is not None


async def test_a_release_decided_for_a_node_made_anew_meanwhile_leaves_the_new_one_gated() -> None:
    writer = Writer(current="new")
    gate = NodeGate(writer, "t", DEADLINE, "10m", lambda n: [], lambda n: None, lambda k: None)  # type: ignore[arg-type]
    assert gate.saw_node("n1", _tainted("old"))
    await gate.release("n1", Decision(Verdict.READY))  # the Node was made anew meanwhile
    assert "n1" not in gate.released
    assert gate.saw_node("n1", _tainted("new"))
