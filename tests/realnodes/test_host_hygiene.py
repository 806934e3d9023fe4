"""A kubelet node changes the host (sysctls, cgroups, bridges, directories, shims that
outlive containerd; its mounts stay in its own mount namespace): stopping it puts
everything back."""

from __future__ import annotations

import subprocess

from kubernetes import client

from tests.coordinator.helpers import wait_for
from tests.realnodes.conftest import pause_image
from tests.testenv import TestEnv
from tests.testenv.kubelet import (
    HOST_LOCK,
    ControlPlaneExtras,
    HostSnapshot,
    KubeletCluster,
    KubeletNode,
)


def test_a_kubelet_node_that_ran_a_pod_leaves_the_host_as_it_found_it(
    testenv: TestEnv, namespace: str
) -> None:
    # The whole host is compared: no other kubelet cluster may start or stop meanwhile
    # (the image GC test's starts in a thread at collection; first in a run of this
    # folder alone, this test took that node's cgroups for its own leftovers).
    with HOST_LOCK:
        before = HostSnapshot.take()
        pause = pause_image(testenv)
        node = KubeletNode(
            testenv.workdir, 9, testenv.apiserver, [testenv.registry.host], pause.ref
        )
        cluster = KubeletCluster(
            testenv.workdir, [node], ControlPlaneExtras(testenv.workdir, testenv.apiserver)
        )
        core = client.CoreV1Api(testenv.api_client())
        try:
            cluster.start(core)
            wait_for(
                "the namespace's default ServiceAccount",
                lambda: core.list_namespaced_service_account(namespace).items,
                timeout=30,
            )
            pod = client.V1Pod(
                metadata=client.V1ObjectMeta(name="hygiene"),
                spec=client.V1PodSpec(
                    node_name=node.name,
                    containers=[client.V1Container(name="c", image=pause.ref)],
                ),
            )
            core.create_namespaced_pod(namespace, pod)
            wait_for(
                "the pod to run",
                lambda: (
                    getattr(core.read_namespaced_pod("hygiene", namespace).status, "phase", "")
                    == "Running"
                ),
                timeout=60,
            )
            during = before.differences(HostSnapshot.take())
            assert any(d.startswith("cgroup added") for d in during), during
            assert any(d.startswith("link added") for d in during), during  # the CNI bridge
            if before.sysctls["net/ipv4/ip_forward"] == "0":  # the bridge plugin turns it on
                assert "sysctl net/ipv4/ip_forward: 0 -> 1" in during, during
            # The node's mounts (its runtime paths, the pod's volumes and network namespace)
            # live in its own mount namespace: the host's mount table does not change.
            assert not [d for d in during if d.startswith("mount added")], during
            inside = node.node_mounts()
            assert {"/run/containerd", "/var/lib/containerd"} <= set(inside), inside
            assert any(str(node.dir / "root" / "pods") in m for m in inside), inside
        finally:
            cluster.stop(core)  # the pod is left running on purpose: teardown must cope
        assert before.differences(HostSnapshot.take()) == []
    left = subprocess.run(
        ["pgrep", "-f", f"kubelet-{node.index}|{node.containerd.socket}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert left.stdout == "", left.stdout
