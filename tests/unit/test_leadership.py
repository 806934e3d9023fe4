"""Leadership fences the work, not only the process's exit: a coordinator paused or
starved past the renew deadline orders and writes nothing when it runs again, even in
the moment before its renewal loop notices that a standby may have taken the Lease."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client

from coordinator.controller import NODE, Controller, ControllerConfig
from coordinator.kube import KubeWriter
from coordinator.leader import LeaderElector
from coordinator.metrics import CoordinatorMetrics
from coordinator.nodes import NodeRegistry
from coordinator.pairs import Counts
from coordinator.plan import Settings
from coordinator.statuswriter import StatusWriter

DEADLINE = 0.5


class Elector(LeaderElector):
    """Renews once, then finds the Lease held by another (as after a long pause)."""

    def __init__(self) -> None:
        super().__init__(
            client.ApiClient(), "ns", "lease", "me", renew_deadline=DEADLINE, retry_period=0.05
        )
        self.answers = [True]

    def try_acquire_or_renew(self) -> bool:
        return self.answers.pop(0) if self.answers else False


def controller(leading: Any) -> Controller:
    api = client.ApiClient()
    registry = NodeRegistry(None, lambda node, delay: None, 60.0)  # type: ignore[arg-type]
    config = ControllerConfig(agent_namespace="ns", settings=Settings(), refresh_every=0)
    return Controller(api, KubeWriter(api), registry, config, leading=leading)


async def test_leadership_lapses_at_the_renew_deadline_without_another_attempt() -> None:
    elector = Elector()
    assert not elector.leading()  # never renewed
    assert await elector._attempt()
    assert elector.leading()
    await asyncio.sleep(DEADLINE * 1.5)
    assert not elector.leading()


async def test_a_key_queued_after_a_stall_past_the_deadline_is_not_acted_on() -> None:
    elector = Elector()
    ctrl = controller(elector.leading)
    assert await elector._attempt()
    acted: list[str] = []
    ctrl.reconcile_node = acted.append  # type: ignore[method-assign,assignment]
    hold = asyncio.create_task(elector.hold())
    worker = asyncio.create_task(ctrl._worker(0))
    ctrl.queue.add((NODE, "before"))
    await asyncio.sleep(0.01)
    assert acted == ["before"]  # leading: acted on
    time.sleep(DEADLINE * 1.5)  # noqa: ASYNC251 -- the loop stalls, as a paused or starved process
    ctrl.queue.add((NODE, "after"))
    await asyncio.wait_for(worker, 1.0)  # the worker stops instead
    assert acted == ["before"]
    await asyncio.wait_for(hold, 1.0)  # and the renewal loop gives up leadership too


class Recorder:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write_status(self, key: str, status: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(key)
        return status


async def test_the_status_writer_writes_nothing_once_leadership_lapsed() -> None:
    leading = [True]
    kube = Recorder()
    writer = StatusWriter(kube, 0.0, CoordinatorMetrics(), lambda: leading[0])  # type: ignore[arg-type]
    writer._write = lambda key, status, counts: kube.write_status(key, status)  # type: ignore[method-assign]
    writer.offer("ns/a", {"status": "Processing"}, Counts(1, 1, {}, {}))
    await writer._write_due()
    leading[0] = False
    writer.offer("ns/b", {"status": "Processing"}, Counts(1, 1, {}, {}))
    await writer._write_due()
    assert kube.writes == ["ns/a"]


class Standby(LeaderElector):
    def __init__(self) -> None:
        super().__init__(client.ApiClient(), "ns", "lease", "standby", lease_duration=DEADLINE)


async def test_a_standby_judges_the_leaders_lease_by_when_it_sees_it_change() -> None:
    """The leader's renewTime says five minutes ago (its clock is slow): while it keeps
    changing the Lease is held; once it stops changing, it runs out a duration later."""
    standby = Standby()
    behind = datetime.now(UTC) - timedelta(minutes=5)

    def spec(renewed: datetime) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(holder_identity="leader", renew_time=renewed)

    assert not standby._expired(spec(behind), DEADLINE)
    await asyncio.sleep(DEADLINE * 0.6)
    assert not standby._expired(spec(behind + timedelta(seconds=1)), DEADLINE)  # renewed
    await asyncio.sleep(DEADLINE * 0.6)
    assert not standby._expired(spec(behind + timedelta(seconds=1)), DEADLINE)
    await asyncio.sleep(DEADLINE * 0.6)
    assert standby._expired(spec(behind + timedelta(seconds=1)), DEADLINE)
