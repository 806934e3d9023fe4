"""A refresh asked by the annotation runs once, though the informer's copy still shows
the annotation after the refresh removed it (the sequence of a CI run's log: the
reconcile after the end read the copy and pulled every image a second time)."""

from __future__ import annotations

from coordinator.refresh import ECHO, Refreshes

KEY = "ns/cache"


def test_the_annotation_still_in_our_copy_after_the_end_is_no_new_refresh() -> None:
    refreshes = Refreshes()
    refreshes.seen(KEY, True, now=100.0, clock=1.0)
    assert refreshes.since(KEY) == 100.0
    refreshes.seen(KEY, True, now=101.0, clock=2.0)  # while it runs: the same refresh
    assert refreshes.since(KEY) == 100.0
    refreshes.finished(KEY, annotated=True, clock=3.0)
    assert refreshes.since(KEY) is None
    wait = refreshes.seen(KEY, True, now=103.5, clock=3.5)  # our removal not back yet
    assert refreshes.since(KEY) is None
    assert wait == ECHO - 0.5  # looked at again then, in case the removal never shows
    assert refreshes.echoing(KEY, clock=3.5)  # removed again, on condition of this copy
    refreshes.removed(KEY)  # the watch shows it gone
    assert not refreshes.echoing(KEY, clock=4.0)
    refreshes.seen(KEY, True, now=110.0, clock=10.0)  # set again: a new request
    assert refreshes.since(KEY) == 110.0


def test_a_removal_never_seen_still_lets_a_later_annotation_count() -> None:
    """A relist may skip the event without the annotation: after ECHO it is new."""
    refreshes = Refreshes()
    refreshes.seen(KEY, True, now=100.0, clock=1.0)
    refreshes.finished(KEY, annotated=True, clock=2.0)
    assert refreshes.seen(KEY, True, now=100.0 + ECHO, clock=2.0 + ECHO) == 0.0
    assert refreshes.since(KEY) == 100.0 + ECHO


def test_the_timer_refreshes_without_an_annotation_and_a_copy_without_it_ends_nothing() -> None:
    refreshes = Refreshes()
    refreshes.timer([KEY, "ns/other"], now=50.0)
    refreshes.seen(KEY, False, now=51.0, clock=1.0)
    assert refreshes.since(KEY) == 50.0
    assert refreshes.since("ns/other") == 50.0
    refreshes.finished(KEY, annotated=False, clock=2.0)
    refreshes.seen(KEY, True, now=53.0, clock=3.0)  # an annotation after a timer refresh
    assert refreshes.since(KEY) == 53.0
    refreshes.forget(KEY)
    assert refreshes.since(KEY) is None
