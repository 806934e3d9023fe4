"""Real kubelets: nodes go Ready, pods run, and the promise of the project holds: a
pod whose image an ImageCache put on its node starts without a pull."""

from __future__ import annotations

from kubernetes import client

from tests.conftest import unique
from tests.coordinator.helpers import apply, cache_manifest, kubectl, wait_for, wait_status
from tests.realnodes.conftest import KUBELET_LABEL, RealNodes
from tests.realnodes.pods import NODE_IMAGES_WAIT, node_image_names, pod_events, pod_on, running
from tests.testenv import TestEnv
from tests.testenv.workload import PAUSE_C, push_program_image, static_binary


def test_kubelet_nodes_are_ready_and_run_a_pod_whose_logs_kubectl_reads(
    real_nodes: RealNodes, testenv: TestEnv, namespace: str
) -> None:
    core = client.CoreV1Api(testenv.api_client())
    wait_for(
        "the default ServiceAccount",
        lambda: core.list_namespaced_service_account(namespace).items,
        timeout=30,
    )
    for node in real_nodes.nodes:
        assert node.ready(core)
        meta = core.read_node(node.name).metadata
        assert meta is not None
        assert (meta.labels or {}).get(KUBELET_LABEL) == "true"
    node = real_nodes.nodes[0]
    core.create_namespaced_pod(namespace, pod_on("hello", node.name, real_nodes.pause.ref))
    wait_for("the pod to run", lambda: running(core, namespace, "hello"), timeout=60)
    logs = wait_for(
        "the pod's log",
        lambda: kubectl(testenv, "-n", namespace, "logs", "hello", check=False).stdout,
        timeout=20,
    )
    assert "fledged workload started" in logs


def test_a_pod_starts_without_a_pull_from_an_image_an_imagecache_put_on_its_node(
    real_nodes: RealNodes, testenv: TestEnv, namespace: str
) -> None:
    """Checked with the kubelet's own view: its Events say the image was already present,
    it never asked the registry for it, and its node status lists the image."""
    core = client.CoreV1Api(testenv.api_client())
    program = static_binary(testenv.workdir, "pause", PAUSE_C)
    repo = unique("realnodes/app")
    image = push_program_image(
        testenv.registry_client(), repo, "v1", program, padding=4 << 20, seed=repo
    )
    selector = {KUBELET_LABEL: "true"}
    apply(
        testenv,
        cache_manifest("app", namespace, [{"images": [image.ref], "nodeSelector": selector}]),
    )
    obj = wait_status(testenv, namespace, "app", "Succeeded", timeout=60)
    assert obj["status"]["ready"] == "2/2"
    wait_for(
        "the default ServiceAccount",
        lambda: core.list_namespaced_service_account(namespace).items,
        timeout=30,
    )
    access_log = testenv.registry.process.log_path
    asked_before = access_log.read_text().count(f"/v2/{repo}/manifests/")
    for i, node in enumerate(real_nodes.nodes):
        core.create_namespaced_pod(namespace, pod_on(f"app-{i}", node.name, image.ref))
    for i, node in enumerate(real_nodes.nodes):
        wait_for(f"app-{i} to run", lambda i=i: running(core, namespace, f"app-{i}"), timeout=60)  # type: ignore[misc]
        events = pod_events(core, namespace, f"app-{i}")
        assert ("Pulled", f'Container image "{image.ref}" already present on machine') in [
            (r, m.split(" and ")[0]) for r, m in events
        ], events
        assert not [e for e in events if e[0] == "Pulling"], events
        wait_for(
            f"{node.name}'s status to list the image",
            lambda n=node: image.ref in node_image_names(core, n.name),  # type: ignore[misc]
            timeout=NODE_IMAGES_WAIT,
        )
    assert access_log.read_text().count(f"/v2/{repo}/manifests/") == asked_before
