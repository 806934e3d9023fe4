"""When each cache's refresh began, and which annotation asks for one. Plain data.

A refresh asked by the `kubefledged.io/refresh-imagecache` annotation ends with our
removal of it; until the removal comes back through the watch, the informer's copy
still shows the annotation. Read as a new request, it would pull every image of the
cache a second time (and a second refresh would be reported as the first's end).
"""

from __future__ import annotations

from collections.abc import Iterable

ECHO = 60.0  # seconds a finished refresh's annotation may still show in our copy


class Refreshes:
    def __init__(self) -> None:
        self._since: dict[str, float] = {}  # cache key -> wall-clock start of its refresh
        self._done: dict[str, float] = {}  # cache key -> monotonic end of an annotated one
        self._latest = 0.0  # the latest start ever

    def since(self, key: str) -> float | None:
        return self._since.get(key)

    def date(self, now: float) -> float:
        """The date a pull's success is given: the latest refresh start so far, not
        `now`. Whether it is at or after a refresh's start reads the same (every start
        is recorded here as it is made, at the wall clock of then), and the fleet's
        successes of one image share one record instead of one date each."""
        return self._latest

    def _start(self, key: str, now: float) -> None:
        if key not in self._since:
            self._since[key] = now
            self._latest = max(self._latest, now)

    def seen(self, key: str, annotated: bool, now: float, clock: float) -> float:
        """The cache as our copy shows it now (`now`: wall clock, `clock`: monotonic).
        An annotation shown within ECHO of the end of the refresh it asked for is that
        refresh's, not a new one. Returns the seconds until such an annotation would
        count as new (0: it counts, or there is none). That the annotation is gone is
        learnt from the watch (`removed`), which sees every change our copy went through."""
        if not annotated:
            return 0.0
        if self.echoing(key, clock):
            return ECHO - (clock - self._done[key])
        self._done.pop(key, None)
        self._start(key, now)
        return 0.0

    def echoing(self, key: str, clock: float) -> bool:
        """A refresh asked by the annotation ended within ECHO and its removal has not
        been seen: if the annotation still shows, removing it again from that copy (on
        condition of its resourceVersion) is safe."""
        ended = self._done.get(key)
        return ended is not None and clock - ended < ECHO

    def removed(self, key: str) -> None:
        """A watch event shows the cache without the annotation: the next is new."""
        self._done.pop(key, None)

    def timer(self, keys: Iterable[str], now: float) -> None:
        """--refresh-every: every cache refreshes (one under way goes on)."""
        for key in keys:
            self._start(key, now)

    def finished(self, key: str, annotated: bool, clock: float) -> None:
        self._since.pop(key, None)
        if annotated:
            self._done[key] = clock

    def forget(self, key: str) -> None:
        self._since.pop(key, None)
        self._done.pop(key, None)
