"""The status writer's bookkeeping: caches forgotten mid-write, oversized statuses.
(Against the real apiserver: tests/coordinator/test_resilience.py.)"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from kubernetes import client

from coordinator.metrics import CoordinatorMetrics
from coordinator.pairs import Counts
from coordinator.status import (
    DETAIL_FIELDS,
    DETAIL_MAX_BYTES,
    fit_status,
    json_size,
    status_room,
)
from coordinator.statuswriter import StatusWriter

COUNTS = Counts(nodes=1, images=1, totals={}, failed={})


class SlowKube:
    """Stands in for KubeWriter: reading cache `a` waits until the test opens `gate`."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reading_a = threading.Event()
        self.written: list[str] = []
        self.too_large = 0  # refuse this many writes as etcd does with a too-large object

    def get_cache(self, namespace: str, name: str) -> dict[str, Any] | None:
        if name == "a":
            self.reading_a.set()
            self.gate.wait(10)
        return {"metadata": {"namespace": namespace, "name": name}, "status": {}}

    def replace_status(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.too_large:
            self.too_large -= 1
            raise client.ApiException(status=500, reason="etcdserver: request is too large")
        self.written.append(obj["metadata"]["name"])
        return obj

    def event(self, obj: Any, type_: str, reason: str, message: str) -> None:
        self.written.append(f"event:{reason}")


def _status(message: str) -> dict[str, Any]:
    return {"status": "Processing", "reason": "ImageCacheCreate", "message": message}


async def _until(check: Any, what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_cache_forgotten_while_another_is_written_does_not_stop_the_writer() -> None:
    """The reported defect: a mass delete forgot caches while a write was awaited, and
    the writer died of a KeyError (then the whole coordinator stopped)."""
    kube = SlowKube()
    writer = StatusWriter(kube, 0.0, CoordinatorMetrics())  # type: ignore[arg-type]
    writer.offer("ns/a", _status("a"), COUNTS)
    writer.offer("ns/b", _status("b"), COUNTS)
    task = asyncio.create_task(writer.run())
    try:
        await asyncio.to_thread(kube.reading_a.wait, 5)
        writer.forget("ns/b")  # deleted while a's write is under way
        kube.gate.set()
        writer.offer("ns/c", _status("c"), COUNTS)
        await _until(lambda: "c" in kube.written or task.done(), "c to be written")
        assert not task.done(), task.exception()
        assert "b" not in kube.written
        assert writer.last_written("ns/b") is None
    finally:
        task.cancel()


async def test_an_oversized_status_is_cut_down_then_never_retried_as_it_was() -> None:
    kube = SlowKube()
    kube.gate.set()
    writer = StatusWriter(kube, 0.0, CoordinatorMetrics())  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    try:
        kube.too_large = 1  # the computed budget is refused once: the smallest is written
        writer.offer("ns/big", _status("big"), COUNTS)
        await _until(lambda: "big" in kube.written, "the cut-down status")
        kube.too_large = 10  # now even the smallest is refused
        writer.offer("ns/big", _status("bigger"), COUNTS)
        await _until(lambda: "event:StatusTooLarge" in kube.written, "the Warning Event")
        refused = kube.too_large
        writer.offer("ns/big", _status("bigger"), COUNTS)  # the same status again
        await asyncio.sleep(0.3)
        assert kube.too_large == refused  # not sent again
        assert not task.done()
    finally:
        task.cancel()


class CountingKube(SlowKube):
    def __init__(self) -> None:
        super().__init__()
        self.gate.set()
        self.reads = 0

    def get_cache(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return super().get_cache(namespace, name)


async def test_a_status_equal_to_the_last_written_costs_no_read() -> None:
    """Every offer read the cache before finding nothing to write: a cache with a
    failure is reconciled every few seconds, each a GET, for as long as it lasts."""
    kube = CountingKube()
    writer = StatusWriter(kube, 0.0, CoordinatorMetrics())  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    try:
        writer.offer("ns/a", {**_status("a"), "startTime": "t1"}, COUNTS)
        await _until(lambda: "a" in kube.written, "the first write")
        reads = kube.reads
        for stamp in ("t2", "t3"):  # the same status, other times
            writer.offer("ns/a", {**_status("a"), "startTime": stamp}, COUNTS)
        await asyncio.sleep(0.2)
        assert kube.reads == reads
        writer.offer("ns/a", _status("changed"), COUNTS)
        await _until(lambda: kube.written.count("a") == 2, "the change written")
    finally:
        task.cancel()


def _huge_status(images: int, nodes: int) -> dict[str, Any]:
    refs = [f"registry.example:5000/{'x' * 200}/app-{i}:{'t' * 120}" for i in range(images)]
    return {
        "status": "Failed",
        "reason": "ImagePullFailedForSomeImages",
        "message": "Image pull failed for some images",
        "observedGeneration": 1,
        "ready": f"0/{images * nodes}",
        "conditions": [{"type": "Ready", "status": "False", "message": "m"}],
        "appliedLists": [{"images": refs}],
        "removing": [{"image": "old:v1"}],
        "images": [{"image": r, "nodesReady": 0, "nodesTotal": nodes} for r in refs],
        "failures": {
            r: [
                {"node": f"node-{n}", "reason": "NotFound", "message": f"{r} not found " * 3}
                for n in range(nodes)
            ]
            for r in refs
        },
        "nodes": [{"node": f"node-{n}", "ready": 0} for n in range(nodes)],
    }


def test_a_status_over_its_budget_keeps_what_is_acted_on_and_says_what_it_left_out() -> None:
    status = _huge_status(images=1000, nodes=3)
    obj = {"metadata": {}, "spec": {"cacheSpec": status["appliedLists"]}}
    fitted = fit_status(status, status_room(obj))
    essentials = {k: v for k, v in status.items() if k not in DETAIL_FIELDS}
    assert json_size(fitted) <= json_size(essentials) + DETAIL_MAX_BYTES
    assert json_size({**obj, "status": fitted}) < 1_400_000
    for kept in ("status", "reason", "conditions", "appliedLists", "removing", "ready"):
        assert fitted[kept] == status[kept]
    omitted = fitted["omitted"]
    assert omitted["nodes"] == 3
    assert omitted["failureEntries"] == 1000 * 2  # each image keeps its first failure
    assert omitted["failedImages"] == 1000 - len(fitted["failures"])
    assert omitted["images"] == 1000 - len(fitted["images"])
    assert fitted["failures"]  # the first failures stay readable
    assert next(iter(fitted["failures"])) == sorted(status["failures"])[0]
    assert fit_status(fitted, status_room(obj)) == fitted  # stable: statuses are compared
    smallest = fit_status(status, 0)  # what the writer tries when the first is refused
    assert json_size(smallest) < json_size(fitted)
    small = _huge_status(images=2, nodes=1)
    assert fit_status(small, status_room(obj)) is small  # it fits: untouched, no `omitted`
