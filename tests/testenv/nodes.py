"""Simulated nodes: a Node object in the real apiserver paired with a real containerd.

There is no kubelet, so nothing else would write the Node; we create it with the
labels a kubelet sets and mark it Ready, and the node's "runtime" is its own containerd.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes import client

from .containerd import Containerd
from .images import host_arch


@dataclass
class SimNode:
    name: str
    containerd: Containerd
    labels: dict[str, str]

    @property
    def runtime_endpoint(self) -> str:
        return self.containerd.endpoint


def node_labels(name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": host_arch(),
        **(extra or {}),
    }


def register_node(
    core: client.CoreV1Api,
    name: str,
    labels: dict[str, str],
    taints: list[dict[str, str]] | None = None,
) -> None:
    """Creates (or relabels) the Node and marks it Ready, as a kubelet would; with
    `taints`, as a kubelet given --register-with-taints registers it."""
    try:
        core.create_node(
            client.V1Node(
                metadata=client.V1ObjectMeta(name=name, labels=labels),
                spec=client.V1NodeSpec(
                    taints=[client.V1Taint(key=t["key"], effect=t["effect"]) for t in taints]
                )
                if taints
                else None,
            )
        )
    except client.ApiException as err:
        if err.status != 409:
            raise
        core.patch_node(name, {"metadata": {"labels": labels}})
    core.patch_node_status(
        name,
        {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "simulated node of the kube-fledged test environment",
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": name},
                ],
            }
        },
    )
