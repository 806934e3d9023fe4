"""Pull orders on one node: policy, de-duplication, the concurrency cap, the disk guard
and deadlines. Runtime-agnostic: it sees only the `Runtime` protocol.

Orders for the same image that overlap share one runtime pull: each order subscribes
to the shared pull's events. A shared pull runs to its end even when every subscriber
has gone (a coordinator restart), so the work is not lost; only `cancel` stops it (no
cache wants the image on this node any more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from common.reference import InvalidReference, normalize, parse

from .config import DiskThreshold
from .errors import AgentError, Category
from .metrics import AgentMetrics
from .runtime import Credentials, FsUsage, ImageRecord, PinState, Progress, Runtime

log = logging.getLogger(__name__)
PROGRESS_EVERY = 0.25  # seconds between progress events of one pull
FS_CACHE_SECONDS = 2.0  # a disk reading this fresh is good enough to refuse or allow a pull
DISK_WATCH_EVERY = 1.0  # seconds between free-space checks while a pull runs


class Phase(StrEnum):
    WAITING = "Waiting"
    PULLING = "Pulling"
    SUCCEEDED = "Succeeded"
    ALREADY_PRESENT = "AlreadyPresent"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.ALREADY_PRESENT, Phase.FAILED, Phase.CANCELLED})


class Policy(StrEnum):
    IF_NOT_PRESENT = "IfNotPresent"
    ALWAYS = "Always"


@dataclass(frozen=True)
class PullOrder:
    image: str
    policy: Policy = Policy.IF_NOT_PRESENT
    credentials: tuple[Credentials, ...] = field(default=(), repr=False)
    deadline: float | None = None
    pin: bool = False
    replace: bool = False  # with ALWAYS: retire the content the tag named before


@dataclass(frozen=True)
class PullEvent:
    image: str
    phase: Phase
    bytes_done: int = 0
    bytes_total: int = 0
    record: ImageRecord | None = None
    repo_digest: str = ""
    pin: PinState | None = None
    category: Category | None = None
    message: str = ""
    time: float = field(default_factory=time.time)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL


def disk_refusal(free: int, capacity: int, threshold: DiskThreshold, needs: int = 0) -> str | None:
    """Why a pull must not start (or go on), or None. Unknown capacity never refuses.
    `needs`: bytes the image is known to take still (a pull of it stopped before)."""
    if capacity <= 0:
        return None
    required = threshold.required(capacity)
    if free - needs >= required:
        return None
    text = f"image filesystem has {free} bytes free of {capacity} ({100 * free / capacity:.1f}%)"
    if free >= required:
        return (
            f"{text}; the image needs {needs} bytes more (learned from its last pull, which "
            f"was stopped), which would leave less than the minimum of {threshold} "
            f"({required} bytes)"
        )
    return f"{text}, below the minimum of {threshold} ({required} bytes)"


# Credentials the node itself has for an image (what its kubelet reads: config.json, plugins).
NodeLookup = Callable[[str], Awaitable[tuple[Credentials, ...]]]


def all_of(lookups: list[NodeLookup]) -> NodeLookup:
    """One lookup asking each in turn (the node's config.json, then its plugins)."""

    async def lookup(image: str) -> tuple[Credentials, ...]:
        found: tuple[Credentials, ...] = ()
        for one in lookups:
            found += await one(image)
        return found

    return lookup


@dataclass
class _Preparing:
    """An order on its way to its shared pull."""

    cancelled: bool = False


# What orders may share one runtime pull: the image and the credentials it is pulled
# with (an order with other credentials, say a fixed Secret, must not join a pull that
# started with the old ones and fail with them).
_Slot = tuple[str, tuple[Credentials, ...]]


class _SharedPull:
    """One runtime pull and the orders waiting on it."""

    def __init__(self, manager: PullManager, key: _Slot, order: PullOrder) -> None:
        self._manager = manager
        self._key = key
        self._order = order
        self._queues: list[asyncio.Queue[PullEvent]] = []
        self._latest: PullEvent | None = None
        self._last_progress = 0.0
        # What the tag named before, for orders that replace it: retired here, by the
        # pull, not by the orders, which may be gone by then (a stream cut mid-pull; the
        # order sent again sees the new content only and had nothing left to retire).
        self.retire: dict[str, ImageRecord] = {}
        self.retired = False  # done with them: an order joining later retires its own
        self.pulled = False  # the runtime pull is over: too late to cancel
        self.cancelled = False
        self.task = asyncio.create_task(self._run(), name=f"pull {key[0]}")

    def cancel(self) -> bool:
        """Stops the pull, queued or running, unless the runtime has finished it."""
        if self.pulled or self.task.done():
            return False
        self.cancelled = True
        self.task.cancel()
        return True

    def _publish(self, event: PullEvent) -> None:
        self._latest = event
        for queue in self._queues:
            queue.put_nowait(event)

    async def events(self) -> AsyncIterator[PullEvent]:
        queue: asyncio.Queue[PullEvent] = asyncio.Queue()
        if self._latest is not None:
            queue.put_nowait(self._latest)  # a late joiner starts from where the pull is
        self._queues.append(queue)
        try:
            while True:
                event = await queue.get()
                yield event
                if event.terminal:
                    return
        finally:
            self._queues.remove(queue)

    def _on_progress(self, progress: Progress) -> None:
        now = time.monotonic()
        complete = progress.bytes_total and progress.bytes_done >= progress.bytes_total
        if now - self._last_progress < PROGRESS_EVERY and not complete:
            return
        self._last_progress = now
        self._publish(
            PullEvent(self._order.image, Phase.PULLING, progress.bytes_done, progress.bytes_total)
        )

    async def _within_disk(self, pull: Coroutine[Any, Any, ImageRecord]) -> ImageRecord:
        """The pull, stopped if the image filesystem falls below the minimum while it
        runs: the check at its start cannot know the image's size, and a large image (or
        two at once) would take the node past the kubelet's eviction threshold, where it
        evicts pods to reclaim space. What was downloaded is left to the runtime's
        garbage collection (on containerd, the pull's lease goes with the stop)."""
        m = self._manager
        task = asyncio.ensure_future(pull)

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, AgentError):
                await task  # the runtime's own clean-up (Docker hangs up) runs to its end

        while True:
            try:
                done, _ = await asyncio.wait({task}, timeout=DISK_WATCH_EVERY)
            except asyncio.CancelledError:  # the agent stopping: the pull stops with it
                await stop()
                raise
            if done:
                return task.result()
            try:
                fs = await m.image_fs(fresh=True)
            except AgentError:
                continue  # the runtime does not answer: the pull will say so
            refusal = disk_refusal(fs.available, fs.capacity, m.min_free_disk)
            if refusal:
                await stop()
                if self._latest is not None and self._latest.bytes_total:
                    # Its retries are refused at their start while the space lacks, instead
                    # of downloading as much again to be stopped again (an edge link).
                    m.too_big[self._key[0]] = self._latest.bytes_total
                raise AgentError(Category.INSUFFICIENT_DISK, f"pull stopped: {refusal}")

    async def _run(self) -> None:
        m = self._manager
        image = self._order.image
        try:
            if m.semaphore.locked():
                self._publish(PullEvent(image, Phase.WAITING))
            async with m.semaphore:
                fs = await m.image_fs()
                needs = m.too_big.get(self._key[0], 0)
                refusal = disk_refusal(fs.available, fs.capacity, m.min_free_disk, needs)
                if refusal:
                    raise AgentError(Category.INSUFFICIENT_DISK, refusal)
                self._publish(PullEvent(image, Phase.PULLING))
                deadline = self._order.deadline or m.default_deadline
                m.metrics.runtime_pulls.inc()
                m.metrics.in_flight.inc()
                started = time.monotonic()
                log.info("runtime pull of %s started", image)
                try:
                    record = await self._within_disk(
                        m.runtime.pull(image, self._order.credentials, deadline, self._on_progress)
                    )
                finally:
                    m.metrics.in_flight.dec()
                    log.info(
                        "runtime pull of %s ended after %.2fs", image, time.monotonic() - started
                    )
                self.pulled = True
                m.metrics.pull_duration.observe(time.monotonic() - started)
                m.metrics.bytes_pulled.inc(record.size)
            m.too_big.pop(self._key[0], None)
            while self.retire:  # orders may join while one is retired
                _, old = self.retire.popitem()
                if old.id != record.id:
                    await m.retire(old, image)
            self.retired = True
            done = self._latest.bytes_total if self._latest else 0
            self._publish(
                PullEvent(
                    image,
                    Phase.SUCCEEDED,
                    bytes_done=done or record.size,
                    bytes_total=done or record.size,
                    record=record,
                )
            )
        except asyncio.CancelledError:
            if not self.cancelled:
                raise  # the agent stopping
            self._publish(PullEvent(image, Phase.CANCELLED))
        except AgentError as err:
            self._publish(
                PullEvent(image, Phase.FAILED, category=err.category, message=err.message)
            )
        except Exception as err:  # a bug or an unexpected runtime answer: report, don't hang
            log.exception("pull of %s failed unexpectedly", image)
            self._publish(
                PullEvent(image, Phase.FAILED, category=Category.INTERNAL, message=str(err))
            )
        finally:
            if m.inflight.get(self._key) is self:  # a cancelled pull may be replaced already
                del m.inflight[self._key]


class PullManager:
    def __init__(
        self,
        runtime: Runtime,
        max_concurrent: int,
        min_free_disk: DiskThreshold,
        default_deadline: float,
        metrics: AgentMetrics | None = None,
        node_credentials: NodeLookup | None = None,
    ) -> None:
        self.runtime = runtime
        self.node_credentials = node_credentials
        self.semaphore = asyncio.Semaphore(max_concurrent)
        self.min_free_disk = min_free_disk
        self.default_deadline = default_deadline
        self.metrics = metrics or AgentMetrics()
        self.inflight: dict[_Slot, _SharedPull] = {}
        self._fs: tuple[float, FsUsage] | None = None
        # image -> its size in bytes, for images whose pull was stopped for the disk
        self.too_big: dict[str, int] = {}
        # image -> orders of it not yet at their shared pull (checking what the node
        # holds, asking its credential plugins): a cancel meanwhile stops them there.
        self._preparing: dict[str, list[_Preparing]] = {}

    def running(self) -> list[str]:
        """The images (normalized) of the pulls under way, queued or being prepared."""
        images = {slot[0] for slot, shared in self.inflight.items() if not shared.cancelled}
        images.update(key for key, orders in self._preparing.items() if orders)
        return sorted(images)

    def cancel(self, image: str) -> bool:
        """Stops every pull of `image` queued or under way, and its orders still being
        prepared: whichever streams ordered them, they end CANCELLED. Returns whether
        there was any. What the runtime downloaded is left to its garbage collection."""
        try:
            key = normalize(image)
        except InvalidReference:
            return False
        stopped = False
        for preparing in self._preparing.get(key, ()):
            preparing.cancelled = stopped = True
        for slot, shared in list(self.inflight.items()):
            if slot[0] == key and shared.cancel():
                stopped = True
        if stopped:
            log.info("pull of %s cancelled: no longer wanted on this node", image)
        return stopped

    async def image_fs(self, fresh: bool = False) -> FsUsage:
        """The image filesystem's usage, read at most every FS_CACHE_SECONDS unless
        `fresh` (a running pull's watch)."""
        now = time.monotonic()
        if fresh or self._fs is None or now - self._fs[0] > FS_CACHE_SECONDS:
            self._fs = (now, await self.runtime.image_fs())
        return self._fs[1]

    async def pull(self, order: PullOrder) -> AsyncIterator[PullEvent]:
        """Events of one order, ending with exactly one terminal event."""
        final: PullEvent | None = None
        try:
            async for event in self._events(order):
                if event.terminal:
                    final = event
                yield event
        finally:
            if final is not None:
                result = {
                    Phase.SUCCEEDED: "succeeded",
                    Phase.ALREADY_PRESENT: "already_present",
                    Phase.CANCELLED: "cancelled",
                }.get(final.phase, "failed")
                self.metrics.pulls.labels(result, final.category or "").inc()

    async def _events(self, order: PullOrder) -> AsyncIterator[PullEvent]:
        try:
            key = normalize(order.image)
        except InvalidReference as err:
            yield PullEvent(
                order.image, Phase.FAILED, category=Category.INVALID_REFERENCE, message=str(err)
            )
            return
        preparing = _Preparing()
        self._preparing.setdefault(key, []).append(preparing)
        try:
            if order.policy != Policy.ALWAYS:
                try:
                    present = await self.runtime.status(order.image)
                except AgentError as err:
                    yield PullEvent(
                        order.image, Phase.FAILED, category=err.category, message=err.message
                    )
                    return
                if present is not None:
                    yield await self._finish(order, Phase.ALREADY_PRESENT, present, present.size)
                    return
            if self.node_credentials is not None:
                # After the cache's Secrets, as the kubelet orders its keyrings.
                extra = await self.node_credentials(order.image)
                if extra:
                    order = replace(order, credentials=order.credentials + extra)
            before = await self._replaced_candidate(order)
        finally:
            waiting = self._preparing[key]
            waiting.remove(preparing)
            if not waiting:
                del self._preparing[key]
        if preparing.cancelled:
            yield PullEvent(order.image, Phase.CANCELLED)
            return
        slot = (key, order.credentials)
        shared = self.inflight.get(slot)
        if shared is None or shared.cancelled:  # wanted again: a pull of its own
            shared = self.inflight[slot] = _SharedPull(self, slot, order)
        if before is not None and not shared.retired:
            shared.retire.setdefault(before.id, before)
            before = None
        async for event in shared.events():
            event = replace(event, image=order.image)
            if event.phase == Phase.SUCCEEDED and event.record is not None:
                if before is not None and before.id != event.record.id:
                    await self.retire(before, order.image)  # joined after the pull's own
                event = await self._finish(order, Phase.SUCCEEDED, event.record, event.bytes_total)
            yield event

    async def _replaced_candidate(self, order: PullOrder) -> ImageRecord | None:
        """What the tag names before a replacing pull (None: nothing to retire)."""
        if not order.replace or order.policy != Policy.ALWAYS:
            return None
        try:
            if not parse(order.image).is_mutable:
                return None
            return await self.runtime.status(order.image)
        except (AgentError, InvalidReference):
            return None  # the pull itself will say what is wrong

    async def retire(self, old: ImageRecord, image: str) -> None:
        """The tag moved: the content it named goes, pin first, unless it is still used.

        Best effort: the pull succeeded whatever happens here; what stays is listed."""
        try:
            now = await self.runtime.status(old.id)
            if now is None:
                return  # gone already (another order of the same pull retired it)
            if now.repo_tags:
                log.info("%s moved; its old content %s keeps tags %s", image, old.id, now.repo_tags)
                return
            if now.pin_foreign:
                if now.pin_owned:  # ours goes; theirs stays
                    await self.runtime.set_pinned(old.id, False)
                log.info("%s moved; its old content %s stays: pinned by another", image, old.id)
                return
            if await self.runtime.in_use(old.id):
                if now.pin_owned:
                    await self.runtime.set_pinned(old.id, False)
                log.info("%s moved; its old content %s stays: a container uses it", image, old.id)
                return
            await self.runtime.remove(old.id)  # lifts our pin first
            self.metrics.replaced.inc()
            log.info("%s moved to new content; removed the old content %s", image, old.id)
        except AgentError as err:
            log.warning("%s moved; its old content %s not removed: %s", image, old.id, err)

    async def _finish(
        self, order: PullOrder, phase: Phase, record: ImageRecord, size: int
    ) -> PullEvent:
        """The terminal event, after pinning when the order asks for it. A pull rewrites
        the tag's record without our pin labels while the image's other records keep
        them: our pin is then put back on every record, so `ctr` shows what CRI says."""
        pin = record.pin
        relabel = phase == Phase.SUCCEEDED and record.pin_owned
        if (order.pin and pin == PinState.UNPINNED) or relabel:
            try:
                pin = await self.runtime.set_pinned(order.image, True)
            except AgentError as err:
                return PullEvent(
                    order.image,
                    Phase.FAILED,
                    record=record,
                    category=err.category,
                    message=f"pulled, but pinning failed: {err.message}",
                )
        return PullEvent(
            order.image,
            phase,
            bytes_done=size,
            bytes_total=size,
            record=record,
            repo_digest=record.digest_for(parse(order.image).name),
            pin=pin,
        )

    async def close(self) -> None:
        self.runtime.stopping()
        for shared in list(self.inflight.values()):
            shared.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shared.task
