"""The pull manager's queueing and sharing, over a scripted in-memory runtime (pure
logic; the same behaviours are proven against real containerd in tests/agent)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from agent.config import DiskThreshold
from agent.errors import AgentError, Category
from agent.puller import Phase, Policy, PullEvent, PullManager, PullOrder
from agent.runtime import Credentials, FsUsage, ImageRecord, PinState, ProgressCallback, RuntimeInfo
from agent.runtime.base import Progress


class ScriptedRuntime:
    """Pulls that finish when the test releases them."""

    def __init__(self, free: int = 10**9, capacity: int = 10**10) -> None:
        self.images: dict[str, ImageRecord] = {}
        self.pulls: list[str] = []
        self.logins: list[tuple[str, ...]] = []  # each pull's credentials, by user name
        self.release = asyncio.Event()
        self.fs = FsUsage(used=0, capacity=capacity, available=free)
        self.fail: AgentError | None = None

    async def info(self) -> RuntimeInfo:
        return RuntimeInfo("fake", "1", "cri", True)

    async def status(self, ref: str) -> ImageRecord | None:
        return self.images.get(ref)

    async def list(self) -> list[ImageRecord]:
        return list(self.images.values())

    async def pull(
        self,
        ref: str,
        credentials: Sequence[Credentials],
        deadline: float,
        on_progress: ProgressCallback,
    ) -> ImageRecord:
        self.pulls.append(ref)
        self.logins.append(tuple(c.username for c in credentials))
        on_progress(Progress(0, 100))
        await self.release.wait()
        if self.fail:
            raise self.fail
        on_progress(Progress(100, 100))
        record = ImageRecord("sha256:id-" + ref, (ref,), (), 100, PinState.UNPINNED)
        self.images[ref] = record
        return record

    async def remove(self, ref: str) -> bool:
        return self.images.pop(ref, None) is not None

    async def in_use(self, image_id: str) -> bool:
        return False

    async def set_pinned(self, ref: str, pinned: bool) -> PinState:
        state = PinState.PINNED if pinned else PinState.UNPINNED
        self.images[ref] = ImageRecord(self.images[ref].id, (ref,), (), 100, state)
        return state

    async def image_fs(self) -> FsUsage:
        return self.fs

    def stopping(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def collect(manager: PullManager, order: PullOrder) -> list[PullEvent]:
    return [e async for e in manager.pull(order)]


def manager_for(runtime: ScriptedRuntime, cap: int = 2) -> PullManager:
    return PullManager(runtime, cap, DiskThreshold.parse("10%"), 60)


async def test_overlapping_orders_for_one_image_share_one_runtime_pull() -> None:
    runtime = ScriptedRuntime()
    manager = manager_for(runtime)
    first = asyncio.create_task(collect(manager, PullOrder("r.io/a:1", pin=True)))
    second = asyncio.create_task(collect(manager, PullOrder("r.io/a:1")))
    await asyncio.sleep(0.05)
    runtime.release.set()
    a, b = await first, await second
    assert runtime.pulls == ["r.io/a:1"]
    assert a[-1].phase == b[-1].phase == Phase.SUCCEEDED
    assert a[-1].pin == PinState.PINNED  # each order applies its own pin wish


async def test_an_order_with_other_credentials_does_not_join_a_running_pull() -> None:
    """A Secret fixed while a pull with the old one waits or runs on the agent: the order
    sent again with the new one pulls with it, not with the old one's failure."""
    runtime = ScriptedRuntime()
    manager = manager_for(runtime)
    old = (Credentials("r.io", "old", "wrong"),)
    new = (Credentials("r.io", "new", "right"),)
    first = asyncio.create_task(collect(manager, PullOrder("r.io/a:1", credentials=old)))
    same = asyncio.create_task(collect(manager, PullOrder("r.io/a:1", credentials=old)))
    fixed = asyncio.create_task(collect(manager, PullOrder("r.io/a:1", credentials=new)))
    await asyncio.sleep(0.05)
    runtime.release.set()
    await asyncio.gather(first, same, fixed)
    assert sorted(runtime.logins) == [("new",), ("old",)]  # the same credentials shared one


class MovingTagRuntime(ScriptedRuntime):
    """Each pull of the tag brings new content; the old content loses the tag."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, ImageRecord] = {}
        self.removed: list[str] = []
        self.serial = 0

    async def status(self, ref: str) -> ImageRecord | None:
        return self.by_id.get(ref) or self.images.get(ref)

    async def pull(
        self,
        ref: str,
        credentials: Sequence[Credentials],
        deadline: float,
        on_progress: ProgressCallback,
    ) -> ImageRecord:
        self.pulls.append(ref)
        on_progress(Progress(0, 100))
        await self.release.wait()
        self.serial += 1
        old = self.images.get(ref)
        if old is not None:  # untagged: only its id names it now
            self.by_id[old.id] = ImageRecord(old.id, (), (), 100, PinState.UNPINNED)
        record = ImageRecord(f"sha256:{self.serial}", (ref,), (), 100, PinState.UNPINNED)
        self.images[ref] = self.by_id[record.id] = record
        return record

    async def remove(self, ref: str) -> bool:
        self.removed.append(ref)
        return self.by_id.pop(ref, None) is not None


async def test_a_replacing_pull_retires_the_old_content_though_its_order_is_gone() -> None:
    """A refresh's stream cut mid-pull (the coordinator restarted): the pull goes on and
    must still retire what the tag named before; the order sent again finds only the new
    content and has nothing left to compare."""
    runtime = MovingTagRuntime()
    manager = manager_for(runtime)
    runtime.release.set()
    await collect(manager, PullOrder("r.io/a:1"))  # the content the tag names first
    first = runtime.images["r.io/a:1"].id
    runtime.release.clear()
    order = PullOrder("r.io/a:1", policy=Policy.ALWAYS, replace=True)
    cut = asyncio.create_task(collect(manager, order))
    await asyncio.sleep(0.05)
    cut.cancel()  # the stream goes; the runtime pull does not
    await asyncio.sleep(0.01)
    runtime.release.set()
    for _ in range(100):
        if not manager.inflight:
            break
        await asyncio.sleep(0.01)
    assert runtime.removed == [first]


async def test_the_cap_queues_pulls_as_waiting() -> None:
    runtime = ScriptedRuntime()
    manager = manager_for(runtime, cap=1)
    tasks = [asyncio.create_task(collect(manager, PullOrder(f"r.io/img:{i}"))) for i in range(3)]
    await asyncio.sleep(0.05)
    assert runtime.pulls == ["r.io/img:0"]
    runtime.release.set()
    results = await asyncio.gather(*tasks)
    assert [r[0].phase for r in results] == [Phase.PULLING, Phase.WAITING, Phase.WAITING]
    assert all(r[-1].phase == Phase.SUCCEEDED for r in results)


async def test_cancel_stops_running_queued_and_preparing_pulls_of_an_image() -> None:
    """Every order of the image ends CANCELLED, whichever stream sent it, and the runtime
    pull is stopped; other images go on; an order after the cancel pulls afresh."""
    runtime = ScriptedRuntime()
    manager = manager_for(runtime, cap=1)
    running = asyncio.create_task(collect(manager, PullOrder("r.io/a:1")))
    joined = asyncio.create_task(collect(manager, PullOrder("r.io/a:1")))
    queued = asyncio.create_task(collect(manager, PullOrder("r.io/b:1")))
    await asyncio.sleep(0.05)
    assert runtime.pulls == ["r.io/a:1"]
    assert manager.running() == ["r.io/a:1", "r.io/b:1"]  # what a listing tells
    assert manager.cancel("r.io/b:1")  # queued behind the cap: never reaches the runtime
    assert manager.cancel("docker.io/library/nothing:1") is False
    assert manager.cancel("not a reference") is False
    assert (await queued)[-1].phase == Phase.CANCELLED
    assert manager.cancel("r.io/a:1")
    for events in (await running, await joined):
        assert events[-1].phase == Phase.CANCELLED
    assert "r.io/a:1" not in runtime.images
    assert not manager.inflight
    # Being prepared (its presence asked of the runtime) when the cancel comes.
    asked = asyncio.Event()
    go_on = asyncio.Event()
    status = runtime.status

    async def slow_status(ref: str) -> ImageRecord | None:
        asked.set()
        await go_on.wait()
        return await status(ref)

    runtime.status = slow_status  # type: ignore[method-assign]
    preparing = asyncio.create_task(collect(manager, PullOrder("r.io/a:1")))
    await asyncio.wait_for(asked.wait(), 5)
    assert manager.cancel("r.io/a:1")
    go_on.set()
    assert [e.phase for e in await preparing] == [Phase.CANCELLED]
    assert runtime.pulls == ["r.io/a:1"]
    runtime.release.set()
    again = await collect(manager, PullOrder("r.io/a:1"))
    assert again[-1].phase == Phase.SUCCEEDED
    assert runtime.pulls == ["r.io/a:1"] * 2


async def test_a_cancel_that_comes_after_the_runtime_pull_ended_changes_nothing() -> None:
    runtime = ScriptedRuntime()
    manager = manager_for(runtime)
    pinning = asyncio.Event()
    set_pinned = runtime.set_pinned

    async def slow_pin(ref: str, pinned: bool) -> PinState:
        pinning.set()
        await asyncio.sleep(0.1)
        return await set_pinned(ref, pinned)

    runtime.set_pinned = slow_pin  # type: ignore[method-assign]
    order = asyncio.create_task(collect(manager, PullOrder("r.io/a:1", pin=True)))
    runtime.release.set()
    await asyncio.wait_for(pinning.wait(), 5)  # pulled; its pin being set
    assert not manager.cancel("r.io/a:1")
    assert (await order)[-1].phase == Phase.SUCCEEDED


async def test_if_not_present_does_not_pull_and_always_does() -> None:
    runtime = ScriptedRuntime()
    runtime.images["r.io/a:1"] = ImageRecord("sha256:x", ("r.io/a:1",), (), 5, PinState.UNPINNED)
    manager = manager_for(runtime)
    present = await collect(manager, PullOrder("r.io/a:1", pin=True))
    assert [e.phase for e in present] == [Phase.ALREADY_PRESENT]
    assert present[0].pin == PinState.PINNED
    runtime.release.set()
    again = await collect(manager, PullOrder("r.io/a:1", policy=Policy.ALWAYS))
    assert again[-1].phase == Phase.SUCCEEDED
    assert runtime.pulls == ["r.io/a:1"]


async def test_low_disk_and_runtime_failures_end_in_one_failed_event() -> None:
    runtime = ScriptedRuntime(free=1, capacity=100)
    manager = manager_for(runtime)
    events = await collect(manager, PullOrder("r.io/a:1"))
    assert [(e.phase, e.category) for e in events] == [(Phase.FAILED, Category.INSUFFICIENT_DISK)]
    runtime.fs = FsUsage(0, 100, 100)
    runtime.fail = AgentError(Category.UNAUTHORIZED, "401")
    runtime.release.set()
    manager = manager_for(runtime)  # a fresh one: disk readings are cached for a moment
    events = await collect(manager, PullOrder("r.io/a:1"))
    assert events[-1].phase == Phase.FAILED
    assert events[-1].category == Category.UNAUTHORIZED
    assert not manager.inflight


@pytest.mark.parametrize("bad", ["UPPER:1", "r.io/a:bad tag"])
async def test_invalid_references_fail_without_touching_the_runtime(bad: str) -> None:
    runtime = ScriptedRuntime()
    events = await collect(manager_for(runtime), PullOrder(bad))
    assert [(e.phase, e.category) for e in events] == [(Phase.FAILED, Category.INVALID_REFERENCE)]
    assert runtime.pulls == []
