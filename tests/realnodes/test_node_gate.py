"""Node readiness gating with a real kubelet: a node registers with the startup taint
while an ImageCache selects it; a Deployment's pods wait Pending, the images arrive,
the coordinator removes the taint, and the pods start without pulling, as the
apiserver and the kubelet's Events tell."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from tests.conftest import unique
from tests.coordinator.helpers import (
    apply,
    cache_manifest,
    get_cache,
    stand_in,
    wait_for,
    wait_status,
)
from tests.realnodes.conftest import kubelet_nodes
from tests.realnodes.pods import pod_events
from tests.testenv import TestEnv
from tests.testenv.agents import CoordinatorProcess
from tests.testenv.proxy import RegistryProxy
from tests.testenv.workload import PAUSE_C, push_program_image, static_binary

TAINT = {"key": "kubefledged.io/caching", "effect": "NoSchedule"}
LABEL = "fledged.test/gated-kubelet"


def deployment(name: str, image: str, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    node_selector={LABEL: "true"},
                    containers=[
                        client.V1Container(name="c", image=image, image_pull_policy="IfNotPresent")
                    ],
                    termination_grace_period_seconds=1,
                ),
            ),
        ),
    )


def phases(core: client.CoreV1Api, namespace: str) -> list[str]:
    items = core.list_namespaced_pod(namespace, label_selector="app=gated").items
    return [str(p.status.phase) if p.status else "" for p in items]


def node_taints(core: client.CoreV1Api, node: str) -> list[dict[str, Any]]:
    spec = core.read_node(node).spec
    return [{"key": t.key, "effect": t.effect} for t in (spec.taints if spec else None) or []]


def test_pods_wait_behind_the_taint_and_start_from_the_cache(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    core = client.CoreV1Api(testenv.api_client())
    apps = client.AppsV1Api(testenv.api_client())
    proxy = RegistryProxy(testenv.registry.host, rate=3 << 20).start()  # a few seconds a pull
    program = static_binary(testenv.workdir, "pause", PAUSE_C)
    repo = unique("gated/app")
    pushed = push_program_image(
        testenv.registry_client(), repo, "v1", program, padding=12 << 20, seed=repo
    )
    image = pushed.ref.replace(pushed.registry, proxy.host)
    args = ("--node-gate-taint=kubefledged.io/caching", "--node-gate-deadline=300s")
    try:
        with stand_in(testenv, coordinator, args, "coordinator-gate-kubelet"):
            apply(
                testenv,
                cache_manifest(
                    "gated", namespace, [{"images": [image], "nodeSelector": {LABEL: "true"}}]
                ),
            )
            settings: dict[str, object] = {"registerWithTaints": [TAINT]}
            spec = {5: ({LABEL: "true"}, settings)}
            with kubelet_nodes(testenv, spec, registry_hosts=(proxy.host,)) as made:
                node = made.nodes[0].name
                wait_for(
                    "the default ServiceAccount",
                    lambda: core.list_namespaced_service_account(namespace).items,
                    timeout=30,
                )
                apps.create_namespaced_deployment(namespace, deployment("gated", image, 2))
                pending = wait_for(
                    "the pods, Pending behind the taint",
                    lambda: found if len(found := phases(core, namespace)) == 2 else None,
                    timeout=30,
                )
                assert TAINT in node_taints(core, node)
                assert pending == ["Pending", "Pending"]
                wait_for(
                    "the taint to go", lambda: TAINT not in node_taints(core, node), timeout=120
                )
                wait_for(
                    "the pods to run",
                    lambda: phases(core, namespace) == ["Running", "Running"],
                    timeout=60,
                )
                for pod in core.list_namespaced_pod(namespace, label_selector="app=gated").items:
                    assert pod.metadata is not None
                    seen = pod_events(core, namespace, str(pod.metadata.name))
                    assert not [e for e in seen if e[0] == "Pulling"], seen
                    assert any(r == "Pulled" and "already present" in m for r, m in seen), seen
                wait_status(testenv, namespace, "gated", "Succeeded")
                # The count follows within a status interval (only a change of state is
                # written at once), so a pod may run before it shows.
                wait_for(
                    "the released node counted in status",
                    lambda: (
                        (get_cache(testenv, namespace, "gated") or {})
                        .get("status", {})
                        .get("nodesReleased")
                        == 1
                    ),
                    timeout=10,
                )
                apps.delete_namespaced_deployment("gated", namespace)
    finally:
        proxy.stop()
