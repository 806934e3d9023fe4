"""Two real kubelet nodes for this folder's tests, next to the suite's simulated nodes.

Module-scoped: the nodes join the suite's cluster only while these tests run (the
other tests count the simulated nodes), and leave the host as they found it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from kubernetes import client

from tests.conftest import reported
from tests.testenv import PushedImage, TestEnv
from tests.testenv.agents import AgentProcess
from tests.testenv.kubelet import ControlPlaneExtras, KubeletCluster, KubeletNode
from tests.testenv.workload import PAUSE_C, push_program_image, static_binary

KUBELET_LABEL = "fledged.test/kubelet"


@dataclass
class RealNodes:
    cluster: KubeletCluster
    pause: PushedImage
    agents: dict[str, AgentProcess]

    @property
    def nodes(self) -> list[KubeletNode]:
        return self.cluster.nodes


def pause_image(testenv: TestEnv) -> PushedImage:
    program = static_binary(testenv.workdir, "pause", PAUSE_C)
    return push_program_image(testenv.registry_client(), "fledged/pause", "v1", program)


@contextlib.contextmanager
def kubelet_nodes(
    testenv: TestEnv,
    specs: dict[int, tuple[dict[str, str], dict[str, object]]],
    registry_hosts: tuple[str, ...] = (),
) -> Iterator[RealNodes]:
    """Kubelet nodes in the suite's cluster, index -> (labels, kubelet settings), each
    with its own containerd and a kube-fledged agent (a host process here, as the
    simulated nodes have theirs); gone afterwards, the host as it was."""
    pause = pause_image(testenv)
    nodes = [
        KubeletNode(
            testenv.workdir,
            index,
            testenv.apiserver,
            [testenv.registry.host, testenv.auth_registry.host, *registry_hosts],
            pause.ref,
            labels=labels,
            kubelet_config=config,
        )
        for index, (labels, config) in specs.items()
    ]
    cluster = KubeletCluster(
        testenv.workdir, nodes, ControlPlaneExtras(testenv.workdir, testenv.apiserver)
    )
    core = client.CoreV1Api(testenv.api_client())
    agents: dict[str, AgentProcess] = {}
    try:
        with reported("kubelet nodes", cluster):
            cluster.start(core)
            for node in nodes:
                agents[node.name] = testenv.start_agent(
                    node_name=node.name,
                    runtime_endpoint=node.containerd.endpoint,
                    name=f"agent-kubelet-{node.index}",
                )
            yield RealNodes(cluster, pause, agents)
    finally:
        for agent in agents.values():
            agent.stop()
        cluster.stop(core)


@pytest.fixture(scope="module")
def real_nodes(testenv: TestEnv, coordinator: object) -> Iterator[RealNodes]:
    """Kubelet nodes 127.0.0.2 and .3, with the kubelet's default settings."""
    with kubelet_nodes(testenv, {i: ({KUBELET_LABEL: "true"}, {}) for i in (1, 2)}) as nodes:
        yield nodes
