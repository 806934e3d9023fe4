"""The agent's Lease, and the coordinator's leadership, are renewed whatever else the
process waits on: renewals ran in the default thread pool, which calls to a hung
Docker daemon (each waiting up to 60 s, a health check's every 5 s) or to a slow
apiserver could fill, so the Lease ran out and a living agent was taken for gone, or
the leader stepped down. The apiserver here is a stand-in: what is tested is where
the renewal runs."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client

from agent.kubeapi import ApiTarget
from agent.lease import LeaseRegistrar
from coordinator.leader import LeaderElector


class _Leases:
    def __init__(self) -> None:
        self.renewals = 0

    def read(self, name: str) -> dict[str, Any]:
        return {"metadata": {"resourceVersion": "1"}, "spec": {}}

    def replace(self, name: str, lease: dict[str, Any]) -> dict[str, Any]:
        self.renewals += 1
        return {"metadata": {"resourceVersion": str(self.renewals)}}


async def test_renewals_go_on_while_runtime_calls_hold_every_pool_thread() -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    hung = threading.Event()
    stuck = [asyncio.create_task(asyncio.to_thread(hung.wait, 10)) for _ in range(4)]
    target = ApiTarget("https", "127.0.0.1", 1, "", None)
    registrar = LeaseRegistrar(target, "ns", "n1", "10.0.0.1:9445", False, "v", 40, 0.05)
    leases = _Leases()
    registrar._leases = leases  # type: ignore[assignment]
    renewing = asyncio.create_task(registrar.run())
    try:
        for _ in range(100):
            if leases.renewals >= 2:
                break
            await asyncio.sleep(0.02)
        assert leases.renewals >= 2
    finally:
        renewing.cancel()
        hung.set()
        await asyncio.gather(*stuck, renewing, return_exceptions=True)


async def test_leadership_renewals_go_on_while_api_calls_hold_every_pool_thread() -> None:
    """The same for the coordinator's leader election: its workers' API calls (up to
    60 s each on a slow apiserver) could hold the default pool's few threads, and a
    renewal queued past the renew deadline ended the leader."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    hung = threading.Event()
    stuck = [asyncio.create_task(asyncio.to_thread(hung.wait, 10)) for _ in range(4)]
    elector = LeaderElector(client.ApiClient(), "ns", "lead", "me", retry_period=0.05)
    attempts: list[float] = []

    def attempt() -> bool:
        attempts.append(time.monotonic())
        return True

    elector.try_acquire_or_renew = attempt  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(elector.acquire(), 2)
        assert elector.leading()
    finally:
        hung.set()
        await asyncio.gather(*stuck, return_exceptions=True)
