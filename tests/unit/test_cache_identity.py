"""A cache deleted and made again under the same name is a new cache, even when the
coordinator never saw the deletion on its own (the DELETED and ADDED events of one key
met in the work queue): it kept the old one's record, so the old applied lists became
removals on the new one and the old purge made the new cache hold nothing."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from coordinator.controller import Controller, ControllerConfig
from coordinator.kube import KubeWriter
from coordinator.nodes import NodeRegistry
from coordinator.plan import Settings

KEY = "ns/c"


def cache(uid: str, images: list[str], status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": "c",
            "uid": uid,
            "generation": 1,
            "resourceVersion": uid + "-1",
        },
        "spec": {"cacheSpec": [{"images": images}]},
        "status": status or {},
    }


async def test_a_cache_made_again_under_its_name_starts_from_nothing() -> None:
    api = client.ApiClient()
    registry = NodeRegistry(None, lambda node, delay: None, 60.0)  # type: ignore[arg-type]
    config = ControllerConfig(agent_namespace="ns", settings=Settings(), refresh_every=0)
    ctrl = Controller(api, KubeWriter(api), registry, config)
    purged = {
        "purgedGeneration": 1,
        "appliedLists": [{"images": ["r.io/old:1", "r.io/kept:1"], "nodeSelector": {}}],
    }
    old, state, _, _ = await ctrl._share(KEY, cache("u1", ["r.io/kept:1"], purged))
    assert old.dormant  # the old one was purged at its generation
    assert [r[0] for r in old.removing] == ["r.io/old:1"]
    new, state, _, _ = await ctrl._share(KEY, cache("u2", ["r.io/kept:1"]))
    assert not new.dormant
    assert new.wants
    assert new.removing == ()
    assert state.uid == "u2"
    # The same object seen again keeps its record.
    _, same, _, _ = await ctrl._share(KEY, cache("u2", ["r.io/kept:1"]))
    assert same is state
