"""Events said again are counted on the first one, as client-go's recorder does.

A cache whose pulls fail on every retry goes Processing -> Failed every few minutes
and says the same Events each time; recorded anew, they pile up as separate objects
(a dozen an hour per cache) and `kubectl describe` lists each. Counted on the first,
it shows one line, "(x12 over 1h)". Only what this process recorded is known: a
restart starts new series, and one whose Event expired (the apiserver keeps Events an
hour by default) is recorded anew.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

SERIES_MAX = 4096  # Events remembered, oldest forgotten first (client-go keeps as many)

# namespace, involved object (uid, else name), kind, type, reason, message
SeriesKey = tuple[str, str, str, str, str, str]


@dataclass(frozen=True)
class Series:
    name: str  # the Event object's
    count: int


class EventSeries:
    """Which Event each thing said was recorded as, and how many times it was said.
    Shared by the threads that record Events."""

    def __init__(self, size: int = SERIES_MAX) -> None:
        self._size = size
        self._known: OrderedDict[SeriesKey, Series] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: SeriesKey) -> Series | None:
        with self._lock:
            series = self._known.get(key)
            if series is not None:
                self._known.move_to_end(key)
            return series

    def said(self, key: SeriesKey, name: str, count: int) -> None:
        with self._lock:
            self._known[key] = Series(name, count)
            self._known.move_to_end(key)
            while len(self._known) > self._size:
                self._known.popitem(last=False)

    def forget(self, key: SeriesKey) -> None:
        with self._lock:
            self._known.pop(key, None)
