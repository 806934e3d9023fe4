"""What the informers keep of each Node and agent Lease: 5,000 of each are kept for
the coordinator's life, so their repeated labels and annotations must be one string
each across the fleet, not one copy per object (the JSON parser makes a new one)."""

from __future__ import annotations

import json

from bench.nodes import kubelet_node
from coordinator.kube import metadata_only, without_managed_fields


def lease(node: str) -> dict[str, object]:
    return {
        "metadata": {
            "name": f"fledged-agent-{node}",
            "labels": {"app.kubernetes.io/component": "agent", "kubefledged.io/node": node},
            "annotations": {"kubefledged.io/agent-endpoint": "10.0.0.1:9301"},
            "managedFields": [{"manager": "agent", "operation": "Update"}],
        },
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 40},
    }


def parsed(obj: object) -> dict[str, object]:
    """As the watch delivers it: every string a new object."""
    result: dict[str, object] = json.loads(json.dumps(obj))
    return result


def test_nodes_share_their_label_strings() -> None:
    a, b = (metadata_only(parsed(kubelet_node(f"n-{i}", i))) for i in (3, 6))
    la, lb = a["metadata"]["labels"], b["metadata"]["labels"]
    assert la["kubernetes.io/os"] == "linux"
    for (ka, va), (kb, vb) in zip(sorted(la.items()), sorted(lb.items()), strict=True):
        assert ka is kb
        if va == vb:
            assert va is vb
    assert "status" not in a


def test_leases_share_their_label_and_annotation_strings() -> None:
    a, b = (without_managed_fields(parsed(lease(n))) for n in ("n-1", "n-2"))
    assert "managedFields" not in a["metadata"]
    assert a["spec"] == {"holderIdentity": "n-1", "leaseDurationSeconds": 40}
    for part in ("labels", "annotations"):
        for (ka, va), (kb, vb) in zip(
            sorted(a["metadata"][part].items()), sorted(b["metadata"][part].items()), strict=True
        ):
            assert ka is kb
            if va == vb:
                assert va is vb
    assert a["metadata"]["annotations"]["kubefledged.io/agent-endpoint"] == "10.0.0.1:9301"
