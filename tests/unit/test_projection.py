"""A cache's projection kept across edits, as the controller keeps it: what its
removals still wait for follows each node's latest share."""

from __future__ import annotations

from coordinator.desired import CacheView, Desired, open_removals
from coordinator.plan import Settings, plan_node
from coordinator.projection import CacheProjection
from tests.unit.test_plan import NOW, everything_list, image, node, view

X = "reg.io/app/x:v1"
Y = "reg.io/app/y:v1"


def _round(desired: Desired, projection: CacheProjection, v: CacheView, obs: object) -> list[str]:
    """The cache's shares as `v` asks, then the node planned and put: its removals."""
    for change in desired.set_cache(v):
        projection.share_changed(change.node, change.share)
    want = desired.node("n1")
    result = plan_node("n1", want, obs, Settings(), NOW)  # type: ignore[arg-type]
    for _, share in want.shares:
        projection.put("n1", share, result)
    return [str(k) for k in result.removals]


def test_an_image_put_back_while_its_removal_runs_leaves_no_removal_open() -> None:
    """Edit 1 takes X out; edit 2 puts it back before the node answered the removal.
    The node stayed busy with X's removal in the projection for good: the cache read
    Processing, `removing` listed X and a refresh never ended, until a restart."""
    obs = node(image(X, True, True), image(Y, True, True))
    desired = Desired()
    desired.set_node("n1", {"zone": "a"})
    projection = CacheProjection()
    first = view(everything_list(Y), applied=(everything_list(X, Y),))
    assert _round(desired, projection, first, obs) == [X]
    obs.removals_ordered([k for k in desired.node("n1").items if str(k) == X])
    removing = open_removals(first)
    assert projection.open_removals(removing) == ((X, ()),)
    # edit 2: X is back; the controller's view still carries the removal it opened
    second = CacheView(
        key="ns/c",
        generation=2,
        spec=view(everything_list(X, Y)).spec,
        applied=(everything_list(Y),),
        removing=removing,
    )
    assert open_removals(second) == ((X, ()),)
    _round(desired, projection, second, obs)
    assert projection.open_removals(open_removals(second)) == ()
    assert projection.settled


def test_a_node_relabelled_out_of_a_removal_while_busy_is_not_waited_for() -> None:
    obs = node(image(X, True, True), image(Y, True, True))
    desired = Desired()
    desired.set_node("n1", {"zone": "a"})
    projection = CacheProjection()
    zoned = everything_list(X, Y, zone="a")
    edit = view(everything_list(Y), applied=(zoned,))
    assert _round(desired, projection, edit, obs) == [X]
    obs.removals_ordered([k for k in desired.node("n1").items if str(k) == X])
    removals = open_removals(edit)
    assert projection.open_removals(removals) == ((X, (("zone", "a"),)),)
    # the node leaves zone a while its removal runs: still the cache's (Y has no
    # selector), no longer the removal's
    for change in desired.set_node("n1", {"zone": "b"}):
        projection.share_changed(change.node, change.share)
    want = desired.node("n1")
    result = plan_node("n1", want, obs, Settings(), NOW)
    for _, share in want.shares:
        projection.put("n1", share, result)
    assert projection.open_removals(removals) == ()
