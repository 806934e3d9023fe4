"""Node objects shaped as kubelets register them, for the scale benchmarks.

A real Node carries kilobytes of status: capacity, conditions, addresses, nodeInfo
and the images the node holds (the kubelet reports up to 50, --node-status-max-images).
With bare Nodes a benchmark never sees what listing or watching 5,000 real ones costs
the coordinator (the first to show it: with the whole list read at once, 5,000 of
them took it to 592 MiB at rest, 289 MiB paged; results/idle_fleet*.md).
This one is ~12.5 KB of JSON before the apiserver adds managedFields.
"""

from __future__ import annotations

import hashlib
from typing import Any

STATUS_IMAGES = 50  # the kubelet's default --node-status-max-images
CONDITIONS = (
    ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
    ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
    ("PIDPressure", "False", "KubeletHasSufficientPID"),
    ("Ready", "True", "KubeletReady"),
)


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def kubelet_node(name: str, index: int) -> dict[str, Any]:
    """Node `name` as its kubelet would create it, holding STATUS_IMAGES images."""
    images = []
    for i in range(STATUS_IMAGES):
        repo = f"registry.example.com/team-{i % 7}/service-{i}"
        images.append(
            {
                "names": [f"{repo}@sha256:{_hex(repo)}", f"{repo}:v1.{i}.0"],
                "sizeBytes": 10_000_000 + i * 123_457,
            }
        )
    resources = {
        "cpu": "4",
        "ephemeral-storage": "102687672Ki",
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
        "memory": "16092280Ki",
        "pods": "110",
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "beta.kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "m5.xlarge",
                "topology.kubernetes.io/region": "eu-west-1",
                "topology.kubernetes.io/zone": f"eu-west-1{'abc'[index % 3]}",
                "node-role.kubernetes.io/worker": "",
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {
            "podCIDR": f"10.{index >> 8 & 255}.{index & 255}.0/24",
            "podCIDRs": [f"10.{index >> 8 & 255}.{index & 255}.0/24"],
            "providerID": f"aws:///eu-west-1a/i-{_hex(name)[:17]}",
        },
        "status": {
            "capacity": resources,
            "allocatable": {**resources, "memory": "15989880Ki"},
            "conditions": [
                {
                    "type": kind,
                    "status": value,
                    "reason": reason,
                    "message": f"kubelet: {reason}",
                    "lastHeartbeatTime": "2026-12-03T10:00:00Z",
                    "lastTransitionTime": "2026-12-01T10:00:00Z",
                }
                for kind, value, reason in CONDITIONS
            ],
            "addresses": [
                {"type": "InternalIP", "address": f"10.0.{index >> 8 & 255}.{index & 255}"},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": _hex(name)[:32],
                "systemUUID": _hex(name + "/uuid")[:36],
                "bootID": _hex(name + "/boot")[:36],
                "kernelVersion": "6.1.0-27-amd64",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "containerRuntimeVersion": "containerd://1.7.24",
                "kubeletVersion": "v1.36.3",
                "kubeProxyVersion": "v1.36.3",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "images": images,
        },
    }
