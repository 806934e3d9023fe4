"""The coordinator's probes: /healthz follows the event loop, not just the process (the
probe server is a thread, so a wedged loop used to answer 200 for ever)."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

from coordinator.main import Probes
from tests.testenv.procs import free_port


def get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_healthz_fails_once_the_loop_stops_beating() -> None:
    now = [100.0]
    probes = Probes(stall_after=30.0, clock=lambda: now[0])
    port = free_port()
    server = probes.serve(f"127.0.0.1:{port}")
    try:
        assert get(port, "/healthz") == 200
        assert get(port, "/readyz") == 503
        probes.ready.set()
        assert get(port, "/readyz") == 200
        now[0] += 30.0
        assert get(port, "/healthz") == 200
        now[0] += 0.5
        assert get(port, "/healthz") == 503
        assert get(port, "/readyz") == 200  # readiness is not liveness
        probes.beat()
        assert get(port, "/healthz") == 200
    finally:
        server.shutdown()
        server.server_close()


async def test_the_heartbeat_runs_on_the_loop() -> None:
    probes = Probes(stall_after=0.2)
    task = asyncio.create_task(probes.heartbeat())
    try:
        await asyncio.sleep(0.5)
        assert probes.live()  # beats every 0.05 s while the loop turns
        time.sleep(0.3)  # noqa: ASYNC251 -- the loop wedged on purpose: no beat meanwhile
        assert not probes.live()
        await asyncio.sleep(0.1)
        assert probes.live()
    finally:
        task.cancel()
