"""Wave slots: how many nodes pull each image at once, fleet-wide, and which nodes wait
for a slot (`maxConcurrentNodesPerImage`). Plain data; the node observations count
their pulls in and out, the planner asks for slots, and a freed slot wakes a waiter."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .images import ImageKey


class WaveSlots:
    def __init__(self, wake: Callable[[str], None] | None = None) -> None:
        self.wake = wake  # node -> None: plan that node again
        self.pulling: dict[ImageKey, int] = {}  # image -> nodes with its pull in flight
        self._waiting: dict[ImageKey, dict[str, int]] = {}  # image -> node -> wave, in order
        self._by_node: dict[str, Mapping[ImageKey, int]] = {}

    def started(self, key: ImageKey) -> None:
        self.pulling[key] = self.pulling.get(key, 0) + 1

    def ended(self, key: ImageKey) -> None:
        left = self.pulling.get(key, 0) - 1
        if left > 0:
            self.pulling[key] = left
        else:
            self.pulling.pop(key, None)
        self._wake_waiters(key)

    def free(self, key: ImageKey, wave: int) -> bool:
        return self.pulling.get(key, 0) < wave

    def wait(self, node: str, queued: Mapping[ImageKey, int]) -> None:
        """`node` now waits for these images (image -> its wave size), and no others.
        An image it stopped waiting for passes its turn on to the next waiter."""
        before = self._by_node.pop(node, {})
        if queued:
            self._by_node[node] = queued
        for key in before:
            if key not in queued:
                waiting = self._waiting.get(key)
                if waiting is not None:
                    waiting.pop(node, None)
                    if not waiting:
                        del self._waiting[key]
                self._wake_waiters(key)
        for key, wave in queued.items():
            self._waiting.setdefault(key, {})[node] = wave

    def _wake_waiters(self, key: ImageKey) -> None:
        """Wakes as many of the first waiters as there are free slots; a woken node
        keeps its place until its plan takes the slot or stops wanting it."""
        waiting = self._waiting.get(key)
        if not waiting or self.wake is None:
            return
        pulling = self.pulling.get(key, 0)
        for woken, (node, wave) in enumerate(list(waiting.items())):
            if pulling + woken >= wave:
                break
            self.wake(node)
