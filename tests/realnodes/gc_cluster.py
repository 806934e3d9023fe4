"""A kubelet node whose image garbage collector takes every image it may, in a cluster
of its own, with an ImageCache of one pinned list and one `pin: false` list on it.

The kubelet's image GC runs every five minutes, from its start (that first pass fails:
the image filesystem's stats are not in yet). So this node is made at the beginning of
the run, in a thread beside the other tests, and checked after them
(tests/conftest.py orders its test last): the suite waits for its pass only when the
rest took less than five minutes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from kubernetes import client

from tests.coordinator.helpers import apply, cache_manifest, wait_status
from tests.testenv import PushedImage, TestEnv
from tests.testenv.agents import AgentProcess, CoordinatorProcess
from tests.testenv.kubelet import ControlPlaneExtras, KubeletCluster, KubeletNode
from tests.testenv.runtime import NodeRuntime
from tests.testenv.workload import PAUSE_C, push_program_image, static_binary

GC_PERIOD = 300.0  # the kubelet's ImageGCPeriod
NAMESPACE = "default"
CACHE = "gc"
# Collect whatever is unused and unpinned, however young: the high threshold is always
# exceeded (any disk is more than 1% full), the low one asks to free everything.
GC_CONFIG: dict[str, object] = {
    "imageGCHighThresholdPercent": 1,
    "imageGCLowThresholdPercent": 0,
    "imageMinimumGCAge": "0s",
}


@dataclass
class Prepared:
    env: TestEnv
    cluster: KubeletCluster
    node: KubeletNode
    agent: AgentProcess
    coordinator: CoordinatorProcess
    pinned: list[PushedImage]
    unpinned: list[PushedImage]  # cached by a list with pin: false
    bystander: PushedImage  # pulled through CRI by hand, in no cache
    kubelet_started: float  # time.monotonic()
    log_offset: int  # of the kubelet's log once the cache was Succeeded


class GcCluster:
    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._prepared: Prepared | None = None
        self._env: TestEnv | None = None
        self._cluster: KubeletCluster | None = None

    def begin(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gc-cluster", daemon=True)
            self._thread.start()

    def wait(self) -> Prepared:
        """The prepared node (starting it now if `begin` was not called)."""
        self.begin()
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("the GC node could not be prepared") from self._error
        assert self._prepared is not None
        return self._prepared

    def _run(self) -> None:
        try:
            self._prepared = self._prepare()
        except BaseException as err:
            self._error = err

    def _prepare(self) -> Prepared:
        env = self._env = TestEnv(nodes=0, with_docker=False)
        env.start()
        env.install_crds()
        registry = env.registry_client()
        program = static_binary(env.workdir, "pause", PAUSE_C)
        pause = push_program_image(registry, "fledged/pause", "v1", program)
        node = KubeletNode(
            env.workdir, 6, env.apiserver, [env.registry.host], pause.ref, kubelet_config=GC_CONFIG
        )
        cluster = self._cluster = KubeletCluster(
            env.workdir, [node], ControlPlaneExtras(env.workdir, env.apiserver)
        )
        cluster.start(client.CoreV1Api(env.api_client()))
        kubelet_started = time.monotonic()
        agent = env.start_agent(
            node_name=node.name, runtime_endpoint=node.containerd.endpoint, name="agent-gc"
        )
        coordinator = env.start_coordinator()

        def push(name: str) -> PushedImage:
            return registry.push_image(f"gc/{name}", "v1", size=1 << 20, seed=f"gc-{name}")

        pinned = [push("pinned-a"), push("pinned-b")]
        unpinned = [push("unpinned-a"), push("unpinned-b")]
        bystander = push("bystander")
        with NodeRuntime(node.containerd.endpoint) as cri:
            cri.pull(bystander.ref)
        apply(
            env,
            cache_manifest(
                CACHE,
                NAMESPACE,
                [
                    {"images": [i.ref for i in pinned]},
                    {"images": [i.ref for i in unpinned], "pin": False},
                ],
            ),
        )
        wait_status(env, NAMESPACE, CACHE, "Succeeded", timeout=120)
        return Prepared(
            env,
            cluster,
            node,
            agent,
            coordinator,
            pinned,
            unpinned,
            bystander,
            kubelet_started,
            node.kubelet.log_path.stat().st_size,
        )

    def log_report(self) -> str:
        parts = [x.log_report() for x in (self._env, self._cluster) if x is not None]
        return "\n".join(parts)

    def stop(self) -> None:
        """Idempotent; waits for a preparation still running first."""
        if self._thread is not None:
            self._thread.join()
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None
        if self._env is not None:
            self._env.cleanup()
            self._env = None


GC_CLUSTER = GcCluster()
