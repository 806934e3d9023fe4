"""Entry point of `fledged-coordinator` (the Deployment): wiring and lifecycle."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import start_http_server

from common import logs
from common.addresses import split_address
from common.lifecycle import stop_on_signals
from coordinator.apiclient import kube_client

from .agents import AgentPool, TlsConfig
from .config import CoordinatorConfig, parse_args
from .controller import Controller, ControllerConfig
from .crdcheck import wait_for_crd
from .kube import KubeWriter
from .leader import LeaderElector
from .metrics import CoordinatorMetrics
from .nodes import NodeRegistry
from .plan import Settings

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from .tlsbootstrap import AgentTls

log = logging.getLogger("coordinator")


class Probes:
    """/healthz: the event loop turns (a wedged loop answers 503, so the kubelet restarts
    the process; the probe server is a thread and would otherwise answer for ever).
    /readyz: informers synced, or standing by for leadership (ready by design)."""

    def __init__(
        self, stall_after: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ready = threading.Event()
        self._stall_after = stall_after
        self._clock = clock
        self._beat = clock()

    def beat(self) -> None:
        self._beat = self._clock()

    def live(self) -> bool:
        return self._clock() - self._beat <= self._stall_after

    async def heartbeat(self) -> None:
        """Beats from the loop itself, a few times per stall period."""
        while True:
            self.beat()
            await asyncio.sleep(min(1.0, self._stall_after / 4))

    def answer(self, path: str) -> tuple[int, bytes]:
        if path == "/healthz":
            return (200, b"ok\n") if self.live() else (503, b"event loop stalled\n")
        if path == "/readyz" and self.ready.is_set():
            return 200, b"ok\n"
        return 503, b"not ready\n"

    def serve(self, address: str) -> ThreadingHTTPServer:
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = probes.answer(self.path)
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        server = ThreadingHTTPServer(split_address(address), Handler)
        threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
        return server


async def run(cfg: CoordinatorConfig) -> int:
    probes = Probes(cfg.liveness_stall_timeout)
    heartbeat = asyncio.create_task(probes.heartbeat(), name="heartbeat")
    try:
        return await _serve(cfg, probes)
    finally:
        heartbeat.cancel()


async def _serve(cfg: CoordinatorConfig, probes: Probes) -> int:
    api = kube_client(cfg.kubeconfig)
    metrics = CoordinatorMetrics()
    if cfg.health_probe_bind_address:
        probes.serve(cfg.health_probe_bind_address)
    if cfg.metrics_bind_address:
        host, port = split_address(cfg.metrics_bind_address)
        start_http_server(port, addr=host, registry=metrics.registry)

    stop = asyncio.Event()
    stop_on_signals(stop)
    if not await wait_for_crd(api, stop):  # not ready meanwhile, standbys included
        return 0

    elector = None
    if cfg.leader_elect:
        elector = LeaderElector(
            api, cfg.leader_election_namespace, cfg.leader_election_id, cfg.identity
        )
        probes.ready.set()  # a standby is ready: it is waiting by design
        acquire = asyncio.create_task(elector.acquire())
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([acquire, waiter], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            acquire.cancel()
            return 0
        waiter.cancel()

    tls = None
    auto_tls = None
    if cfg.agent_tls_auto:
        auto_tls = await _auto_tls(cfg, api)
        tls = auto_tls.config
    elif cfg.agent_tls_ca and cfg.agent_tls_cert and cfg.agent_tls_key:
        tls = TlsConfig(
            cfg.agent_tls_ca, cfg.agent_tls_cert, cfg.agent_tls_key, cfg.agent_tls_server_name
        )
    pool = AgentPool(tls)
    controller: Controller | None = None

    def node_changed(node: str, delay: float) -> None:
        if controller is not None:
            controller.node_changed(node, delay)

    def orders_answered(key: str) -> None:
        if controller is not None:
            controller.orders_answered(key)

    registry = NodeRegistry(
        pool, node_changed, cfg.image_pull_deadline, on_answered=orders_answered
    )
    controller = Controller(
        api,
        KubeWriter(api),
        registry,
        ControllerConfig(
            agent_namespace=cfg.agent_namespace,
            settings=Settings(always_pull=cfg.always_pull, wave=cfg.max_concurrent_nodes_per_image),
            refresh_every=cfg.refresh_every,
            workers=cfg.workers,
            watch_namespace=cfg.watch_namespace,
            byte_progress_max_nodes=cfg.byte_progress_max_nodes,
            gate_taint=cfg.node_gate_taint,
            gate_deadline=cfg.node_gate_deadline,
            gate_deadline_text=cfg.node_gate_deadline_text,
        ),
        metrics,
        leading=elector.leading if elector is not None else lambda: True,
    )
    metrics.is_leader.set(1)
    tasks = [asyncio.create_task(controller.run(stop, probes.ready), name="controller")]
    if elector is not None:
        tasks.append(asyncio.create_task(elector.hold(), name="leadership"))
    if auto_tls is not None:
        tasks.append(asyncio.create_task(_keep_current(auto_tls, pool), name="tls-renewal"))
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if not stop.is_set():
        code = 1  # leadership lost or the controller died: exit, let the Deployment restart us
        stop.set()
    for task in tasks:
        if task not in done:
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await registry.close()
    await pool.close()
    if elector is not None:
        await asyncio.to_thread(elector.release)
    log.info("coordinator stopped")
    return code


async def _auto_tls(cfg: CoordinatorConfig, api: ApiClient) -> AgentTls:
    """The mTLS material made current (`--agent-tls-auto`). Imported only then:
    cryptography costs 8 MiB of resident memory, and only mTLS needs it."""
    from .tlsbootstrap import AgentTls

    auto_tls = AgentTls(api, cfg.agent_namespace)
    await asyncio.to_thread(auto_tls.renew)
    return auto_tls


async def _keep_current(tls: AgentTls, pool: AgentPool) -> None:
    """Issues the mTLS certificates anew before they expire, for as long as we lead; a
    channel dialled with a client certificate replaced goes (dialled anew when next
    used). A failed check is tried again sooner than the period."""
    from .tlsbootstrap import RENEW_EVERY

    wait = RENEW_EVERY
    while True:
        await asyncio.sleep(wait)
        try:
            if await asyncio.to_thread(tls.renew):
                log.info("client certificate issued anew; agent channels are dialled again")
                await pool.reset()
            wait = RENEW_EVERY
        except Exception:
            log.exception("checking the agent channel's certificates failed; again in 10 min")
            wait = 600.0


GC_THRESHOLD = (50_000, 20, 20)  # allocations between young collections, then ratios


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logs.setup(cfg.log_format, cfg.log_level)
    # Over thousands of nodes the coordinator holds a few million small objects; with
    # the default thresholds the collector walks them over and over while orders go out.
    gc.set_threshold(*GC_THRESHOLD)
    return asyncio.run(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
