"""Pods on kubelet nodes, and what the kubelet says of them."""

from __future__ import annotations

from kubernetes import client


def pod_on(name: str, node: str, image: str, pull_secrets: tuple[str, ...] = ()) -> client.V1Pod:
    """A pod bound to `node` (no scheduler involved), its image pulled if not present."""
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            node_name=node,
            containers=[
                client.V1Container(name="c", image=image, image_pull_policy="IfNotPresent")
            ],
            image_pull_secrets=[client.V1LocalObjectReference(name=s) for s in pull_secrets]
            or None,
            termination_grace_period_seconds=1,
        ),
    )


def running(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    status = core.read_namespaced_pod(name, namespace).status
    return status is not None and status.phase == "Running"


def waiting_reason(core: client.CoreV1Api, namespace: str, name: str) -> str:
    """Why the pod's container waits (ErrImagePull, ImagePullBackOff, ...), or ""."""
    status = core.read_namespaced_pod(name, namespace).status
    for container in (status.container_statuses if status else None) or []:
        if container.state and container.state.waiting:
            return str(container.state.waiting.reason or "")
    return ""


# How long a Node's status may take to show an image the runtime holds: the kubelet
# lists its runtime's images every 30 s (its image GC manager's cache) and reports them
# at its next status update (2 s here). A wait of 30 s failed once on a busy machine.
NODE_IMAGES_WAIT = 75.0


def node_image_names(core: client.CoreV1Api, node: str) -> set[str]:
    """The images the kubelet reports in its Node's status."""
    status = core.read_node(node).status
    return {name for img in (status.images if status else None) or [] for name in img.names or []}


def pod_events(core: client.CoreV1Api, namespace: str, name: str) -> list[tuple[str, str]]:
    """(reason, message) of the Events about the pod."""
    items = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    ).items
    return [(e.reason or "", e.message or "") for e in items]
